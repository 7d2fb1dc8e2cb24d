#!/usr/bin/env bash
# One-shot set-up of the compose stack (the `init` service); every step is idempotent, so
# `docker compose up` may run it again. Credentials come from the environment (.env).
set -euo pipefail

echo "==> MLflow database and role"
python - <<'PY'
import os

import psycopg2
from psycopg2 import sql

conn = psycopg2.connect(host="postgres", dbname="airflow", user="airflow",
                        password=os.environ["POSTGRES_PASSWORD"])
conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
cur = conn.cursor()
cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'")
verb = "ALTER" if cur.fetchone() else "CREATE"
cur.execute(sql.SQL(verb + " ROLE mlflow WITH LOGIN PASSWORD {}").format(
    sql.Literal(os.environ["MLFLOW_DB_PASSWORD"])))
cur.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
if not cur.fetchone():
    cur.execute("CREATE DATABASE mlflow OWNER mlflow")
PY

echo "==> buckets"
python - <<'PY'
import os

import boto3

s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in (os.environ["SD_PIPELINE_BUCKET"], os.environ["MLFLOW_BUCKET"]):
    if bucket not in have:
        s3.create_bucket(Bucket=bucket)
    print(f"s3://{bucket}")
PY

echo "==> Airflow metadata database"
airflow db migrate

echo "==> Airflow connections and the GPU pool"
# aws_default carries the endpoint only: keys stay in the environment, not in the metadata DB.
if ! airflow connections get aws_default >/dev/null 2>&1; then
  airflow connections add aws_default --conn-type aws \
    --conn-extra "{\"endpoint_url\": \"${AWS_ENDPOINT_URL}\", \"region_name\": \"${AWS_DEFAULT_REGION}\"}"
fi
if ! airflow connections get mlflow_default >/dev/null 2>&1; then
  airflow connections add mlflow_default --conn-type http --conn-host mlflow --conn-port 5000
fi
pool=$(python -c "from sd_pipeline.airflow.settings import pipeline_config as c; print(c().compute.kubernetes.pool)")
airflow pools set "${pool}" "${SD_PIPELINE_GPU_SLOTS}" "GPUs Airflow may hold at once: a pod takes one slot per GPU"

echo "==> demo inputs (synthetic raw data, tiny base model) in ${SD_PIPELINE_HOME}"
sd-pipeline setup
