# syntax=docker/dockerfile:1
# Airflow 3.3 with the sd_pipeline package, its DAGs and pipeline configs. By default it
# holds no training stack: train and evaluate run as pods of docker/train.Dockerfile.
#
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/sd-pipeline/airflow:0.1.0 .
#
# The compose stack adds ",train" to SD_PIPELINE_EXTRAS (CPU wheels of torch) so that its
# local backend can train on one machine without a cluster.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
# What the Airflow tasks run themselves: ingest (data), the quality gate (quality),
# registration (tracking) and the object store (s3).
ARG SD_PIPELINE_EXTRAS=data,s3,quality,tracking
ARG PIP_EXTRA_INDEX_URL=

# The image's convention: files of user airflow, group 0. The home folder is where the
# compose stack mounts its shared volume (raw data, tiny model).
USER root
RUN mkdir -p /opt/sd-pipeline/home && chown -R airflow:0 /opt/sd-pipeline
USER airflow
WORKDIR /opt/sd-pipeline
COPY --chown=airflow:0 . /opt/sd-pipeline/
# constraints.txt pins the versions the test suite ran with; apache-airflow stays at the
# image's version so pip never swaps the Airflow underneath the image.
RUN pip install --no-cache-dir -c constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" "/opt/sd-pipeline[${SD_PIPELINE_EXTRAS}]"

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/sd-pipeline/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/sd-pipeline/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    SD_PIPELINE_CONFIG=/opt/sd-pipeline/configs/compose.yaml \
    SD_PIPELINE_HOME=/opt/sd-pipeline/home \
    GX_ANALYTICS_ENABLED=false
