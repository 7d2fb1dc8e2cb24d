"""Backfilling daily dataset versions through Airflow's real scheduler.

Starts the API server (tasks talk to its execution API), the DAG processor and the
scheduler on a fresh home (tests/airflow_stack.py), runs `airflow backfill create` for
three days of a source templated with {{ ds }}, and checks what a user would: one accepted version per day,
LATEST on the newest day, and a rerun of a built day that changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_stack import airflow_stack

from sd_pipeline.synthetic import generate_shapes_dataset

REPO = Path(__file__).resolve().parent.parent
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict[str, str], attempts: int = 3) -> str:
    """Run a CLI call; retried, since the metadata DB is SQLite shared with the scheduler."""
    for attempt in range(attempts):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return out.stdout
        time.sleep(3 * (attempt + 1))
    raise AssertionError(f"{cmd[1:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


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
    airflow = Path(sys.executable).with_name("airflow")
    # No triggerer: nothing in sd_ingest defers.
    services = ("api-server", "dag-processor", "scheduler")
    with airflow_stack(home, services=services, extra_env={"SD_PIPELINE_CONFIG": str(config)}) as stack:
        env = stack.env
        stack.wait_for_dags(["sd_ingest", "sd_train"])
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
        for run_id in sorted(wanted):  # a failed day shows its task logs
            stack.wait_for_run("sd_ingest", run_id, timeout=420)

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
