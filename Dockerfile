# sparkme on an NVIDIA GPU: CUDA devel base (nvcc for MinkowskiEngine), the same
# installer as on a bare machine in CUDA mode (same patch set), demo pretraining by default.
#
#   docker build -t sparkme .
#   docker run --gpus all --rm -v $PWD/outputs:/opt/sparkme/outputs sparkme
#   docker run --gpus all --rm sparkme .venv/bin/python -m pytest
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    SPARKME_ME_MODE=cuda \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0" \
    SPARKME_TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu130 --extra-index-url https://pypi.org/simple" \
    CUDA_HOME=/usr/local/cuda

RUN apt-get update -qq \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential \
       ninja-build libopenblas-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sparkme
# everything the installer needs (pip install -e . reads the package folders)
COPY scripts/ scripts/
COPY pyproject.toml README.md ./
COPY sparkme/ sparkme/
COPY conf/ conf/
COPY converters/ converters/
COPY benchmarks/ benchmarks/
RUN scripts/install.sh
COPY tests/ tests/

CMD [".venv/bin/sparkme-pretrain"]
