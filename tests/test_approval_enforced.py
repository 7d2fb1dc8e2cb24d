"""Approval is the config's to require: a trigger may ask for it, never switch it off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from airflow_stack import dags_env

from sd_pipeline.airflow.params import approval_wanted
from sd_pipeline.config import parse_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("configured", "asked", "wanted"),
    [
        (True, True, True),
        (True, None, True),
        (False, True, True),
        (False, False, False),
        (False, None, False),
    ],
)
def test_the_form_can_add_an_approval_but_the_config_decides_when_one_is_required(
    configured: bool, asked: bool | None, wanted: bool
) -> None:
    registry = parse_config({"registry": {"require_approval": configured}}).registry
    params = {} if asked is None else {"require_approval": asked}
    assert approval_wanted(params, registry) is wanted


def test_a_trigger_cannot_switch_off_an_approval_the_config_requires() -> None:
    registry = parse_config({"registry": {"require_approval": True}}).registry
    with pytest.raises(ValueError, match=r"registry\.require_approval is true"):
        approval_wanted({"require_approval": False}, registry)


@pytest.mark.slow
def test_sd_train_refuses_a_conf_that_switches_off_the_required_approval(home: Path) -> None:
    """Real Airflow: prepare_run fails naming the setting, and no run is prepared or stored."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["registry"]["require_approval"] = True
    path = home / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dags_env(home, path)
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [airflow, "dags", "test", "sd_train", "-c", json.dumps({"require_approval": False})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = out.stdout + out.stderr
    assert "prepare_run failed" in log and "registry.require_approval is true" in log, log[-4000:]
    assert not (home / "store" / "runs").exists()
