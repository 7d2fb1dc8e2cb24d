"""The DAG files: they load, they stay thin at parse time, and they have the right shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAG_FILES = sorted((REPO / "dags").glob("*.py"))
HEAVY = [
    "torch",
    "diffusers",
    "transformers",
    "great_expectations",
    "mlflow",
    "boto3",
    "botocore",
    "pandas",
    "pyarrow",
    "PIL",
    "peft",
    "accelerate",
    "tokenizers",
    "safetensors",
]

# Run in a fresh interpreter: the test process itself has heavy modules loaded already.
PROBE = r"""
import json, runpy, sys
heavy = set(json.loads(sys.argv[2]))
target = sys.argv[1]
if target == "-":
    from airflow.sdk import DAG, Asset, Param, task
    with DAG("bare", schedule=None, params={"p": Param(1, type="integer")}):
        task(lambda: 1, task_id="t", outlets=[Asset("s3://bucket/key")])()
else:
    runpy.run_path(target, run_name="__dag_check__")
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)))
"""


def _heavy_loaded(target: str, env: dict[str, str]) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, target, json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture
def airflow_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "SD_PIPELINE_HOME": str(home),
    }


def test_every_dag_file_loads_without_import_errors(
    airflow_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    for k, v in airflow_env.items():
        monkeypatch.setenv(k, v)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert {"sd_ingest", "sd_train"} <= set(bag.dag_ids)


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_parsing_a_dag_imports_nothing_heavy(dag_file: Path, airflow_env: dict[str, str]) -> None:
    baseline = _heavy_loaded("-", airflow_env)  # what Airflow itself loads for an s3:// Asset
    extra = _heavy_loaded(str(dag_file), airflow_env) - baseline
    assert extra == set(), f"{dag_file.name} pulls in {sorted(extra)} at parse time"


def test_probe_would_notice_a_heavy_import(tmp_path: Path, airflow_env: dict[str, str]) -> None:
    bad = tmp_path / "bad_dag.py"
    bad.write_text("import pandas\nfrom airflow.sdk import DAG\nDAG('bad', schedule=None)\n")
    assert "pandas" in _heavy_loaded(str(bad), airflow_env) - _heavy_loaded("-", airflow_env)


def test_ingest_dag_gates_and_emits_the_dataset_asset(
    airflow_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    for k, v in airflow_env.items():
        monkeypatch.setenv(k, v)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    ingest, train = bag.dags["sd_ingest"], bag.dags["sd_train"]
    gate = ingest.get_task("quality_gate")
    assert [t.task_id for t in gate.upstream_list] == ["commit"]
    # plan -> ingest_unit (mapped: one task per unit) -> commit
    assert [t.task_id for t in ingest.get_task("commit").upstream_list] == ["ingest_unit"]
    assert [t.task_id for t in ingest.get_task("ingest_unit").upstream_list] == ["plan"]
    assert type(ingest.get_task("ingest_unit")).__name__.endswith("MappedOperator")
    assert [o.name for o in gate.outlets] == ["sd_dataset_shapes"]
    # sd_train runs on that asset, and its tasks run in order.
    assert "sd_dataset_shapes" in str(train.timetable.asset_condition)
    assert {t.task_id for t in train.get_task("register").upstream_list} == {"evaluate", "prepare_run"}
    assert {t.task_id for t in train.get_task("cache").upstream_list} == {"prepare_run"}
    assert {t.task_id for t in train.get_task("train").upstream_list} == {"cache", "prepare_run"}


def test_train_form_params_are_typed_and_bounded(
    airflow_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    for k, v in airflow_env.items():
        monkeypatch.setenv(k, v)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["sd_train"]
    params = dag.params
    assert params["method"] == "full"  # the form defaults to the pipeline config
    assert params.get_param("steps").schema["minimum"] == 1
    with pytest.raises(ParamValidationError):
        params.get_param("steps").resolve(0)
    with pytest.raises(ParamValidationError):
        params.get_param("dataset_version").resolve("../etc")
    with pytest.raises(ParamValidationError):
        params.get_param("method").resolve("dreambooth")
