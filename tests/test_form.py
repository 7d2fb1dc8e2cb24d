"""The sd_train trigger form: what it offers, what it refuses, and how a run's values take effect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from sd_pipeline.airflow.params import (
    base_model_choices,
    overrides_from_params,
    train_params,
    unknown_conf_keys,
)
from sd_pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo(home: Path) -> Any:
    return load_config(REPO / "configs" / "demo.yaml")


def resolve(params: dict[str, Param], **values: Any) -> dict[str, Any]:
    """What Airflow does with a trigger's conf: each value checked against its param's schema."""
    bag = ParamsDict(params)
    for key, value in values.items():
        bag[key] = value
    return bag.validate()


def test_the_form_offers_the_configured_base_models_by_title(demo: Any, home: Path) -> None:
    params = train_params(demo)
    base = params["base_model"]
    assert base.value == "tiny-sd"
    assert base.schema["enum"] == ["tiny-sd", "tiny-sdxl"]
    assert base.schema["values_display"]["tiny-sdxl"] == "Tiny SDXL (demo)"
    overrides = overrides_from_params(resolve(params, base_model="tiny-sdxl"), demo)
    assert overrides["model.base"] == str(home / "models" / "tiny-sdxl")
    # A base that is not among the choices is still offered, as "configured".
    other = demo.model_copy(update={"model": demo.model.model_copy(update={"base": "/models/sd15"})})
    assert base_model_choices(other)[0] == ("configured", "Configured base (/models/sd15)", "/models/sd15")


@pytest.mark.parametrize("value", ["latest", "last:3", "window:7d", "0123456789abcdef",
                                   "0123456789abcdef,fedcba9876543210"])
def test_dataset_versions_take_the_config_grammar(demo: Any, value: str) -> None:
    assert resolve(train_params(demo), dataset_version=value)["dataset_version"] == value


@pytest.mark.parametrize(("field", "value"), [
    ("dataset_version", "last week"), ("dataset_version", "window:7"), ("resolution", 100),
    ("resolution", 4096), ("steps", 0), ("method", "dreambooth"), ("base_model", "sd-turbo"),
])
def test_bad_values_are_refused_by_the_form(demo: Any, field: str, value: Any) -> None:
    with pytest.raises(Exception, match=field):
        resolve(train_params(demo), **{field: value})


def test_gpus_are_a_field_only_where_pods_train(demo: Any) -> None:
    assert "gpus" not in train_params(demo)  # local: the worker's devices
    kube = demo.model_copy(update={"compute": demo.compute.model_copy(update={"backend": "kubernetes"})})
    params = train_params(kube)
    assert params["gpus"].value == 1
    assert overrides_from_params(resolve(params, gpus=4), kube)["compute.train.gpus"] == 4


def test_unknown_conf_keys_are_named() -> None:
    assert unknown_conf_keys({"step": 5, "seed": 1}, {"steps": 60, "seed": 0}) == ["step"]
    assert unknown_conf_keys({}, {"steps": 60}) == []


def test_a_pod_takes_its_gpu_count_from_the_runs_stored_config(bucket: str, s3_env: str) -> None:
    """The DAG is parsed with 1 GPU; a run that asked for 4 in the form gets a 4-GPU DDP pod."""
    from test_kubernetes import RUN, base_container, build_pod, kube_config

    from sd_pipeline.storage import Store

    parsed = kube_config(**{"storage.root": f"s3://{bucket}/sd", "storage.endpoint_url": s3_env})
    resolved = kube_config(**{"storage.root": f"s3://{bucket}/sd", "storage.endpoint_url": s3_env,
                              "compute.train.gpus": 4})
    Store.from_uri(f"s3://{bucket}/sd").put_bytes("runs/r1/config.json", resolved.to_json().encode())
    run = {**RUN, "run_id": "r1", "config_uri": f"s3://{bucket}/sd/runs/r1/config.json"}

    _, dry, context = build_pod("train", parsed, run)
    assert base_container(dry).resources.limits["nvidia.com/gpu"] == "1"
    op = context["task"]
    op._shape_for_run()  # what building the pod for a real run does first (a dry run skips it)
    pod = op.build_pod_request_obj(context, dry_run=True)
    base = base_container(pod)
    assert base.resources.limits["nvidia.com/gpu"] == "4"
    command = [*base.command, *base.args]
    assert command[:2] == ["accelerate", "launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--config") + 1] == run["config_uri"]
