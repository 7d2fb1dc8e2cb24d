"""Stages through the CLI: the gate accepts or rejects a version, and LATEST follows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_pipeline.quality.safety import build_tiny_safety_classifier
from sd_pipeline.synthetic import generate_shapes_dataset

REPO = Path(__file__).resolve().parent.parent


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("sd-pipeline")
    env = {**os.environ, "SD_PIPELINE_HOME": str(home), "GX_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [str(exe), *args, "--config", str(REPO / "configs" / "demo.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def ingested(home: Path) -> str:
    generate_shapes_dataset(home / "raw" / "shapes", count=120)
    build_tiny_safety_classifier(home / "models" / "safety-tiny")  # configs/demo.yaml scores with it
    out = _cli(home, "ingest")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["version"])


def test_passing_gate_makes_the_version_latest(home: Path, ingested: str) -> None:
    out = _cli(home, "validate", "--version", ingested)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["passed"] is True
    assert (home / "store/datasets/shapes/LATEST").read_text() == ingested
    quality = home / "store/datasets/shapes/versions" / ingested / "quality"
    assert json.loads((quality / "verdict.json").read_text())["passed"] is True


def test_failing_gate_names_the_expectation_and_leaves_latest_alone(home: Path, ingested: str) -> None:
    out = _cli(home, "validate", "--version", ingested, "--set", "quality.min_rows=100000")
    assert out.returncode == 3
    assert "failed its quality gate" in out.stderr
    assert "expect_table_row_count_to_be_between" in out.stderr
    assert not (home / "store/datasets/shapes/LATEST").exists()
    rejected = home / "store/datasets/shapes/versions" / ingested / "REJECTED"
    assert json.loads(rejected.read_text())["passed"] is False


def test_training_refuses_a_dataset_with_no_accepted_version(home: Path, ingested: str) -> None:
    out = _cli(home, "prepare")
    assert out.returncode == 1
    assert "has no accepted version yet" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_errors_exit_2_with_the_field(home: Path) -> None:
    out = _cli(home, "ingest", "--set", "dataset.resolution=7")
    assert out.returncode == 2
    assert "dataset.resolution" in out.stderr


def test_ingest_command_takes_source_dataset_and_store(home: Path, tmp_path: Path) -> None:
    raw = generate_shapes_dataset(tmp_path / "incoming", count=30)
    exe = Path(sys.executable).with_name("sd-pipeline")
    out = subprocess.run(
        [
            str(exe),
            "ingest",
            str(raw),
            "--dataset",
            "incoming",
            "--store",
            str(tmp_path / "st"),
            "--set",
            "safety.classifier=null",
            "--set",
            "quality.min_rows=1",
            "--json",
        ],
        env={**os.environ, "SD_PIPELINE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["store"] == f"file://{tmp_path / 'st'}"
    assert result["uri"] == f"file://{tmp_path}/st/datasets/incoming/versions/{result['version']}"
    assert result["accepted"] + result["quarantined"] == result["inputs"] == 38
