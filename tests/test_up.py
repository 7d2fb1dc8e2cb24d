"""`make up`: the local UIs, where every visitor is an admin, listen on this machine only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd_pipeline.demo import uis_env
from sd_pipeline.home import EmbeddedHome


def test_the_all_admin_airflow_listens_on_loopback_only(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even when the shell says otherwise: with every visitor an admin, a LAN bind is a takeover.
    monkeypatch.setenv("AIRFLOW__API__HOST", "0.0.0.0")
    env = uis_env(EmbeddedHome.from_env())
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    # What Airflow itself reads from that environment: the api-server's --host default.
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run(
        [str(airflow), "config", "get-value", "api", "host"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "127.0.0.1"
