"""The embedded demo: prepare the home, run both DAGs through Airflow, print a summary.

Airflow runs the DAGs itself (``airflow dags test`` goes through its task runner and
SQLite metadata DB); nothing here calls the stages directly.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sd_pipeline.config import PipelineConfig
from sd_pipeline.home import EmbeddedHome, airflow_env
from sd_pipeline.ingest.versions import latest_key, version_prefix
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.demo")


def _inside(path: Path, root: Path) -> bool:
    return root.resolve() in path.resolve().parents


def _airflow_bin() -> str:
    exe = Path(sys.executable).with_name("airflow")
    return str(exe) if exe.exists() else (shutil.which("airflow") or "airflow")


def setup_embedded_home(config: PipelineConfig) -> dict[str, Any]:
    """Make the raw data, the tiny base model and the Airflow DB; each only once."""
    from sd_pipeline.models.tiny import build_tiny_model
    from sd_pipeline.synthetic import all_captions, generate_shapes_dataset

    home = EmbeddedHome.from_env()
    home.root.mkdir(parents=True, exist_ok=True)
    made: dict[str, Any] = {"home": str(home.root)}
    raw = Path(urlparse(config.dataset.source.uri).path)
    if _inside(raw, home.root):
        generate_shapes_dataset(raw)
        made["raw_data"] = str(raw)
    # The tiny models the config names inside the home: its base and the form's choices.
    kinds = {home.base_model: "sd", home.base_model_sdxl: "sdxl"}
    for uri in dict.fromkeys([config.model.base, *(c.base for c in config.model.choices)]):
        base = Path(uri)
        if uri.startswith("s3://") or not _inside(base, home.root):
            continue
        kind = kinds.get(base)
        if kind is None:
            raise ValueError(
                f"model base {uri} is inside the embedded home but is not one of the tiny models "
                f"the demo builds ({', '.join(str(k) for k in kinds)})"
            )
        build_tiny_model(base, all_captions(), kind=kind)
        made.setdefault("base_models", []).append(str(base))
    classifier = config.safety.classifier
    if classifier and not classifier.startswith("s3://") and _inside(Path(classifier), home.root):
        from sd_pipeline.quality.safety import build_tiny_safety_classifier

        build_tiny_safety_classifier(Path(classifier))
        made["safety_classifier"] = classifier
    env = {**os.environ, **airflow_env(home)}
    stamp = home.airflow_home / ".migrated"
    # Not `import airflow`: that would write an airflow.cfg under ~/airflow of this process.
    from importlib.metadata import version

    airflow_version = version("apache-airflow-core")
    if not stamp.exists() or stamp.read_text() != airflow_version:
        home.airflow_home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [_airflow_bin(), "db", "migrate"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        stamp.write_text(airflow_version)
    made["airflow_home"] = str(home.airflow_home)
    home.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return made


def run_dag(dag_id: str, env: dict[str, str], log_dir: Path, conf: str | None = None) -> float:
    """``airflow dags test`` one DAG; its full log goes to a file, failures show the tail."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{dag_id}.log"
    cmd = [_airflow_bin(), "dags", "test", dag_id]
    if conf:
        cmd += ["--conf", conf]
    print(f"==> airflow dags test {dag_id}  (log: {log_file})", flush=True)
    started = time.perf_counter()
    with log_file.open("w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log_file.read_text().splitlines()[-60:]
        raise RuntimeError(
            f"DAG {dag_id} failed (exit {code}) after {seconds:.0f}s; last log lines:\n" + "\n".join(tail)
        )
    print(f"    {dag_id} succeeded in {seconds:.1f}s", flush=True)
    return seconds


def run_demo(config: PipelineConfig) -> dict[str, Any]:
    started = time.perf_counter()
    home = EmbeddedHome.from_env()
    print(f"==> preparing the embedded home {home.root}", flush=True)
    setup_embedded_home(config)
    # The DAGs read their config from a file: hand them this one, --set overrides included.
    resolved = home.root / "pipeline.json"
    resolved.write_text(config.to_json())
    env = {**os.environ, **airflow_env(home), "SD_PIPELINE_CONFIG": str(resolved)}
    log_dir = home.root / "logs"
    timings = {dag: run_dag(dag, env, log_dir) for dag in ("sd_ingest", "sd_train")}
    summary = demo_summary(config)
    summary["seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    print(format_summary(summary), flush=True)
    return summary


def demo_summary(config: PipelineConfig) -> dict[str, Any]:
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    version = store.read_pointer(latest_key(config.dataset.name))
    run_id = store.read_pointer(f"pipelines/{config.name}/LAST_RUN")
    if version is None or run_id is None:
        raise RuntimeError("the DAGs finished but no accepted dataset version or registered run is recorded")
    prefix = version_prefix(config.dataset.name, version)
    ingested = store.get_json(f"{prefix}/ingest.json")
    verdict = store.get_json(f"{prefix}/quality/verdict.json")
    registered = store.get_json(f"runs/{run_id}/registered.json")
    promotion = (
        store.get_json(f"runs/{run_id}/promotion.json")
        if store.exists(f"runs/{run_id}/promotion.json")
        else {}
    )
    return {
        "dataset": config.dataset.name,
        "dataset_version": version,
        "accepted": ingested["accepted"],
        "quarantined": ingested["quarantined"],
        "quarantine_reasons": ingested["quarantine_reasons"],
        "gate": "passed" if verdict["passed"] else "failed",
        "quality_report": verdict.get("report_uri"),
        "datacard": verdict.get("datacard_uri"),
        "run_id": run_id,
        "mlflow_run_id": registered["mlflow_run_id"],
        "model_name": registered["model_name"],
        "model_version": registered["model_version"],
        "alias": registered.get("alias"),
        "metrics": registered.get("metrics", {}),
        "promotion": promotion.get("decision"),
        "promotion_reason": promotion.get("reason"),
        "champion": promotion.get("champion"),
        "sample_grid": registered["grid_uri"],
        "tracking_uri": config.registry.tracking_uri,
    }


def format_summary(s: dict[str, Any]) -> str:
    m = s.get("metrics", {})
    loss = (
        f"{m['holdout_loss']:.4f} (base model {m['base_holdout_loss']:.4f})"
        if "holdout_loss" in m and "base_holdout_loss" in m
        else "n/a"
    )
    reasons = ", ".join(f"{k}={v}" for k, v in s["quarantine_reasons"].items()) or "none"
    lines = [
        "",
        "sd-pipeline demo finished",
        f"  dataset version   {s['dataset']}/{s['dataset_version']}",
        f"  samples           {s['accepted']} accepted, {s['quarantined']} quarantined ({reasons})",
        f"  quality gate      {s['gate']}",
        f"  training run      {s['run_id']}",
        f"  holdout loss      {loss}",
        f"  MLflow run        {s['mlflow_run_id']}",
        f"  registered model  {s['model_name']} version {s['model_version']} (@{s['alias']})",
        f"  promotion         {s['promotion']}: champion is version {s['champion']}"
        if s.get("promotion")
        else "",
        f"  sample grid       {s['sample_grid']}",
        f"  quality report    {s['quality_report']}",
        f"  data card         {s.get('datacard')}",
        f"  time              {s['seconds']['total']:.0f}s" if "seconds" in s else "",
        "  browse it:        make up   (Airflow http://127.0.0.1:8080, MLflow http://127.0.0.1:5000)",
    ]
    return "\n".join(line for line in lines if line)


def uis_env(home: EmbeddedHome) -> dict[str, str]:
    """The environment `make up` runs Airflow standalone and MLflow in."""
    return {
        **os.environ,
        **airflow_env(home),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # Every visitor is an admin (no login), so only this machine may reach it; Airflow's
        # default is 0.0.0.0, the whole network. A shared Airflow is deployed (docs/deploy.md).
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": "8080",
        # standalone starts its components as `airflow …` from PATH: this venv's first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def serve_uis(config: PipelineConfig) -> None:
    """Airflow (standalone: api-server, scheduler, dag-processor, triggerer) and MLflow UI."""
    home = EmbeddedHome.from_env()
    setup_embedded_home(config)
    env = uis_env(home)
    mlflow = Path(sys.executable).with_name("mlflow")
    procs = [
        subprocess.Popen([_airflow_bin(), "standalone"], env=env),
        subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                "5000",
                "--backend-store-uri",
                config.registry.tracking_uri,
                "--default-artifact-root",
                str(home.mlflow_artifacts),
            ],
            env=env,
        ),
    ]
    print("Airflow: http://127.0.0.1:8080   MLflow: http://127.0.0.1:5000   (Ctrl-C stops both)")
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
