# Official PyTorch runtime image (CUDA build; runs on CPU too).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/vnet
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY bundle/ ./bundle/
WORKDIR /opt/vnet/bundle
# e.g. docker run -v /data:/data IMAGE python -m monai.bundle run --config_file configs/inference.yaml \
#        --dataset_dir /data/scans --output_dir /data/masks
CMD ["python", "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--dataset_dir", "/data/in", "--output_dir", "/data/out"]
