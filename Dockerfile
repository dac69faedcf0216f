# The bundle as a BIDS App: `docker run IMAGE bids_dir output_dir participant|group [options]` (README.md, "Docker"),
# and any other command, e.g. `docker run IMAGE python -m monai.bundle run --config_file configs/inference.yaml ...`.
# It runs as clusters run it: under any uid, on a read-only root file system with a tmpfs /tmp, without a network.
# Python 3.11 (Debian 12) and torch 2.13.0, the versions the tests run with; from the package index torch's Linux wheel
# is the CUDA build, so the image runs on a GPU (docker run --gpus all) and on the CPU alike.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/vnet/bundle \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # an arbitrary uid has no passwd entry: Python's getpass reads USER first; every cache goes to the tmpfs /tmp
    USER=bids \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor

RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir torch==2.13.0
COPY requirements.txt /opt/vnet/
RUN pip install --no-cache-dir -r /opt/vnet/requirements.txt
COPY bundle/ /opt/vnet/bundle/
# byte-compiled here, as the read-only image cannot write __pycache__ at run time
RUN python -m compileall -q /opt/vnet/bundle/scripts \
    && chmod -R a+rX /opt/vnet

WORKDIR /opt/vnet/bundle
USER 65534:65534
ENTRYPOINT ["python", "-m", "scripts.inference.bids_app"]
CMD ["--help"]
