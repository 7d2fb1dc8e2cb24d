"""Backfilling daily dataset versions through Airflow's real scheduler.

Starts the API server (tasks talk to its execution API), the DAG processor and the
scheduler on a fresh home, runs `airflow backfill create` for three days of a source
templated with {{ ds }}, and checks what a user would: one accepted version per day,
LATEST on the newest day, and a rerun of a built day that changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from sd_pipeline.synthetic import generate_shapes_dataset

REPO = Path(__file__).resolve().parent.parent
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd[1:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _run(cmd: list[str], env: dict[str, str], attempts: int = 3) -> str:
    """Run a CLI call; retried, since the metadata DB is SQLite shared with the scheduler."""
    for attempt in range(attempts):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return out.stdout
        time.sleep(3 * (attempt + 1))
    raise AssertionError(f"{cmd[1:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def _runs(airflow: Path, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [str(airflow), "dags", "list-runs", "sd_ingest", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    # Airflow may log warnings before the JSON; the JSON is the line that starts a list.
    lines = [line for line in out.stdout.splitlines() if line.startswith(("[{", "[]"))]
    rows = json.loads(lines[-1]) if lines else []
    return {r["run_id"]: r["state"] for r in rows}


def test_backfill_builds_one_version_per_day(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for i, day in enumerate(DAYS):
        generate_shapes_dataset(home / "raw" / day, count=40, seed=i + 1)
    config = home / "pipeline.yaml"
    config.write_text(
        "name: daily\n"
        f"storage: {{root: 'file://{home}/store'}}\n"
        "dataset:\n  name: daily\n  schedule: '@daily'\n"
        f"  source: {{uri: 'file://{home}/raw/{{{{ ds }}}}'}}\n"
        "quality: {min_rows: 20, max_quarantine_rate: 0.3}\n"
        "safety: {classifier: null}\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "SD_PIPELINE_HOME": str(home),
        "SD_PIPELINE_CONFIG": str(config),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "GX_ANALYTICS_ENABLED": "false",
    }
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], env=env, check=True, capture_output=True)
    logs = home / "logs"
    logs.mkdir()
    services = [
        subprocess.Popen(
            [str(airflow), *cmd],
            env=env,
            stdout=(logs / f"{cmd[0]}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop each service with its workers
        )
        for cmd in (["api-server", "-p", str(port)], ["dag-processor"], ["scheduler"])
    ]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the DAG processor has serialized our DAGs
            listed = subprocess.run([str(airflow), "dags", "list"], env=env, capture_output=True, text=True)
            if "sd_ingest" in listed.stdout and "sd_train" in listed.stdout:
                break
            time.sleep(2)
        # Keep this test about ingestion: no training on the new versions.
        _run([str(airflow), "dags", "pause", "sd_train"], env)
        _run(
            [
                str(airflow),
                "backfill",
                "create",
                "--dag-id",
                "sd_ingest",
                "--from-date",
                DAYS[0],
                "--to-date",
                DAYS[-1],
            ],
            env,
        )
        wanted = {f"backfill__{day}T00:00:00+00:00" for day in DAYS}
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            states = _runs(airflow, env)
            if all(states.get(r) in ("success", "failed") for r in wanted):
                break
            time.sleep(3)
        assert {r: states.get(r) for r in wanted} == dict.fromkeys(wanted, "success"), (
            logs / "scheduler.log"
        ).read_text()[-3000:]
    finally:
        for proc in services:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in services:
            proc.wait(timeout=60)

    datasets = home / "store" / "datasets" / "daily"
    per_day = {day: (datasets / "dates" / day).read_text() for day in DAYS}
    assert len(set(per_day.values())) == 3  # three different deliveries, three versions
    assert (datasets / "LATEST").read_text() == per_day[DAYS[-1]]
    for version in per_day.values():
        assert (datasets / "versions" / version / "_COMMITTED").exists()
        assert (datasets / "versions" / version / "DATACARD.md").exists()
    # Rerunning a built day (the CLI a backfill task runs) changes nothing.
    before = {p: p.stat().st_mtime_ns for p in (datasets / "versions").rglob("*") if p.is_file()}
    exe = Path(sys.executable).with_name("sd-pipeline")
    again = json.loads(_run([str(exe), "ingest", "--config", str(config), "--date", DAYS[1], "--json"], env))
    assert (again["version"], again["created"]) == (per_day[DAYS[1]], False)
    after = {p: p.stat().st_mtime_ns for p in (datasets / "versions").rglob("*") if p.is_file()}
    assert after == before
