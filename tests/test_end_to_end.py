"""The spine end to end, as `make demo` runs it: Airflow runs both DAGs on a fresh home.

Asserts on what a user gets (an accepted dataset version, a registered model version in
MLflow with its alias, a sample grid, a quality report), not only on exit codes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("demo-home")
    env = {**os.environ, "SD_PIPELINE_HOME": str(home), "GX_ANALYTICS_ENABLED": "false"}
    cli = Path(sys.executable).with_name("sd-pipeline")
    out = subprocess.run(
        [str(cli), "demo", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "train.steps=20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert out.returncode == 0, f"demo failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return home, out.stdout


def test_demo_prints_the_summary(demo_home: tuple[Path, str]) -> None:
    _, stdout = demo_home
    for label in (
        "dataset version",
        "quality gate      passed",
        "MLflow run",
        "registered model",
        "promotion         promoted: champion is version 1",
        "sample grid",
        "quality report",
    ):
        assert label in stdout


def test_airflow_ran_both_dags_successfully(demo_home: tuple[Path, str]) -> None:
    home, _ = demo_home
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "SD_PIPELINE_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    }
    airflow = Path(sys.executable).with_name("airflow")
    for dag in ("sd_ingest", "sd_train"):
        out = subprocess.run(
            [str(airflow), "dags", "list-runs", dag, "-o", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert '"state": "success"' in out.stdout, out.stdout


def test_model_is_registered_with_alias_and_lineage(demo_home: tuple[Path, str]) -> None:
    home, _ = demo_home
    from mlflow import MlflowClient

    client = MlflowClient(
        tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", registry_uri=f"sqlite:///{home}/mlflow/mlflow.db"
    )
    mv = client.get_model_version_by_alias("sd-demo-shapes", "challenger")
    assert str(mv.version) == "1"
    run = client.get_run(mv.run_id)
    version = (home / "store" / "datasets" / "shapes" / "LATEST").read_text().strip()
    assert run.data.tags["dataset.version"] == version
    assert run.data.params["train.steps"] == "20"
    assert run.data.metrics["holdout_loss"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/grid.png", "eval/metrics.json"} <= artifacts


def test_grid_and_quality_report_are_in_the_store(demo_home: tuple[Path, str]) -> None:
    from PIL import Image

    home, _ = demo_home
    store = home / "store"
    grids = list(store.glob("runs/*/eval/grid.png"))
    assert len(grids) == 1
    img = Image.open(io.BytesIO(grids[0].read_bytes()))
    assert img.size[0] >= 64 * 2 and img.size[1] >= 64 * 4  # 2 seeds x 4 prompts
    version = (store / "datasets" / "shapes" / "LATEST").read_text().strip()
    quality = store / "datasets" / "shapes" / "versions" / version / "quality"
    assert (quality / "validation.json").exists()
    assert "expect" in (quality / "index.html").read_text().lower()


LINK_PROBE = r"""
import json, sys
from airflow.models.dagrun import DagRun
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.session import create_session
from sd_pipeline.airflow.links import read_link, xcom_key
out = {}
with create_session() as session:
    for dag_id, task_id, names in (("sd_ingest", "quality_gate", ["quality_report", "datacard", "data_docs"]),
                                   ("sd_train", "register", ["sample_grid", "mlflow_run", "model_version"])):
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        key = TaskInstanceKey(dag_id, task_id, run.run_id, 1, -1)
        for name in names:
            out[name] = read_link(xcom_key(name), key)
print(json.dumps(out))
"""


def test_tasks_link_to_their_reports_and_models(demo_home: tuple[Path, str]) -> None:
    """What the UI's extra-link buttons resolve to, read the way the API server reads them."""
    home, _ = demo_home
    env = {**os.environ, "AIRFLOW_HOME": str(home / "airflow"), "SD_PIPELINE_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", LINK_PROBE], env=env, capture_output=True, text=True, check=True
    )
    links = json.loads(out.stdout.strip().splitlines()[-1])
    assert links["quality_report"].startswith("/sd-pipeline/store/datasets/shapes/versions/")
    assert links["quality_report"].endswith("/quality/index.html")
    assert links["datacard"].endswith("/DATACARD.md")
    assert "/quality/data_docs/validations/" in links["data_docs"]
    assert links["sample_grid"].endswith("/eval/grid.png")
    assert "/#/experiments/" in links["mlflow_run"] and "/runs/" in links["mlflow_run"]
    assert links["model_version"].endswith("/#/models/sd-demo-shapes/versions/1")


def test_the_api_server_shows_the_links_and_serves_the_reports(demo_home: tuple[Path, str]) -> None:
    """The real Airflow API server, with our plugin: extra links resolve, reports open."""
    import time
    import urllib.request
    from urllib.parse import quote

    from conftest import free_port

    home, _ = demo_home
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "SD_PIPELINE_HOME": str(home),
        "SD_PIPELINE_CONFIG": str(home / "pipeline.json"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
    }
    airflow = Path(sys.executable).with_name("airflow")
    log = (home / "api-server.log").open("w")
    server = subprocess.Popen(
        [str(airflow), "api-server", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers go with it: the whole group is stopped below
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            base + path, headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if get("/api/v2/monitor/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        token = json.loads(get("/auth/token")[1])["access_token"]
        runs = json.loads(get("/api/v2/dags/sd_ingest/dagRuns?order_by=-start_date", token)[1])
        run_id = quote(runs["dag_runs"][0]["dag_run_id"], safe="")
        status, body = get(f"/api/v2/dags/sd_ingest/dagRuns/{run_id}/taskInstances/quality_gate/links", token)
        links = json.loads(body)["extra_links"]
        assert status == 200 and links["Quality report"].startswith("/sd-pipeline/store/")
        status, page = get(links["Quality report"])
        assert status == 200 and b"expect" in page.lower()
        assert get(links["Data card"])[0] == 200
        assert get(links["Quality report"].replace("quality/index.html", "manifest.parquet"))[0] == 404
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_rebuild_cache_dag_recomputes_the_runs_cache(demo_home: tuple[Path, str]) -> None:
    """The operations DAG a user runs after replacing a base model in place."""
    home, _ = demo_home
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "SD_PIPELINE_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "SD_PIPELINE_CONFIG": str(REPO / "configs" / "demo.yaml"),
        "SD_PIPELINE_NO_PROGRESS": "1",
    }
    caches = sorted((home / "store" / "cache" / "shapes").glob("*/index.json"))
    assert len(caches) == 1, "the demo's training built one latent cache"
    before = json.loads(caches[0].read_text())
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run(
        [str(airflow), "dags", "test", "sd_rebuild_cache"], env=env, capture_output=True, text=True,
        timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert (caches[0].parent / "_COMMITTED").exists()
    after = json.loads(caches[0].read_text())
    assert after["fingerprint"] == before["fingerprint"] and after["buckets"] == before["buckets"]
    assert after["built_at"] > before["built_at"]  # rebuilt, same identity
