# Python 3.11 and torch 2.13.0, the versions the tests run with. From PyPI, torch's Linux wheel is the CUDA build:
# the image runs on a GPU (docker run --gpus all) and on CPU alike.
FROM python:3.11-slim
WORKDIR /opt/vnet
RUN pip install --no-cache-dir torch==2.13.0
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY bundle/ ./bundle/
WORKDIR /opt/vnet/bundle
# e.g. docker run -v /data:/data IMAGE python -m monai.bundle run --config_file configs/inference.yaml \
#        --dataset_dir /data/scans --output_dir /data/masks
CMD ["python", "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--dataset_dir", "/data/in", "--output_dir", "/data/out"]
