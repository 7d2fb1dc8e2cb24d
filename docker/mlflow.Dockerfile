# syntax=docker/dockerfile:1
# The MLflow tracking server of the compose stack: PostgreSQL backend, artifacts on S3
# (MinIO), at the MLflow version the package is tested with.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt mlflow psycopg2-binary boto3 \
    && useradd --uid 1000 --create-home mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
