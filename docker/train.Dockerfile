# syntax=docker/dockerfile:1
# The training image: what a GPU pod runs (`sd-pipeline train|evaluate ...`, under
# `accelerate launch` for several GPUs). No Airflow inside. PyTorch's CUDA wheels bring
# their own CUDA libraries; the node supplies the NVIDIA driver.
#
#   docker build -f docker/train.Dockerfile -t ghcr.io/sd-pipeline/train:0.1.0 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GX_ANALYTICS_ENABLED=false \
    SD_PIPELINE_HOME=/scratch/sd-pipeline \
    HF_HOME=/scratch/huggingface

WORKDIR /opt/sd-pipeline
COPY pyproject.toml README.md constraints.txt ./
COPY sd_pipeline ./sd_pipeline
RUN pip install --no-cache-dir -c constraints.txt ".[train,s3,tracking]" \
    && rm -rf /root/.cache

# The pod's securityContext runs as 1000 (sd_pipeline.airflow.kubernetes.UID).
RUN useradd --uid 1000 --gid 0 --create-home --home-dir /home/trainer trainer \
    && mkdir -p /scratch && chown 1000:0 /scratch
USER 1000
WORKDIR /home/trainer
CMD ["sd-pipeline", "--help"]
