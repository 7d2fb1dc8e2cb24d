"""The Airflow plugin: its links and its read-only report app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_pipeline.airflow.links import LINK_NAMES, store_url, xcom_key
from sd_pipeline.airflow.store_app import create_app, is_public
from sd_pipeline.storage import Store

REPO = Path(__file__).resolve().parent.parent
V = "0123456789abcdef"


@pytest.mark.parametrize(
    "key, public",
    [
        (f"datasets/shapes/versions/{V}/quality/index.html", True),
        (f"datasets/shapes/versions/{V}/quality/data_docs/validations/x.html", True),
        (f"datasets/shapes/versions/{V}/DATACARD.md", True),
        ("runs/demo-abc/eval/grid.png", True),
        (f"datasets/shapes/versions/{V}/shards/shard-000000.tar", False),
        (f"datasets/shapes/versions/{V}/manifest.parquet", False),
        ("runs/demo-abc/final/pytorch_lora_weights.safetensors", False),
        (f"datasets/shapes/versions/{V}/quality/../manifest.parquet", False),
    ],
)
def test_only_published_reports_are_public(key: str, public: bool) -> None:
    assert is_public(key) is public


def anyone() -> None:
    """Lets every request through: these tests are about which keys are served. Who may read
    is checked against a real API server in test_security_web.py."""


def test_app_serves_reports_and_refuses_the_rest(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    store = Store.from_uri(f"file://{tmp_path}")
    store.put_bytes(f"datasets/shapes/versions/{V}/quality/index.html", b"<h1>gate</h1>")
    store.put_bytes(f"datasets/shapes/versions/{V}/manifest.parquet", b"secret rows")
    client = TestClient(create_app(lambda: store, authorize=anyone))
    ok = client.get(f"/store/datasets/shapes/versions/{V}/quality/index.html")
    assert ok.status_code == 200 and ok.text == "<h1>gate</h1>"
    assert ok.headers["content-type"].startswith("text/html")
    assert client.get(f"/store/datasets/shapes/versions/{V}/manifest.parquet").status_code == 404
    assert client.get(f"/store/datasets/shapes/versions/{V}/quality/nope.html").status_code == 404


def test_store_urls_point_at_the_app() -> None:
    root = "file:///h/store"
    assert store_url(root, f"{root}/runs/r1/eval/grid.png") == "/sd-pipeline/store/runs/r1/eval/grid.png"
    assert store_url(root, "file:///elsewhere/x.png") is None
    assert xcom_key("sample_grid") == "sd_link_sample_grid"


def test_airflow_loads_the_plugin_with_every_link(home: Path) -> None:
    probe = (
        "import json\n"
        "from airflow import plugins_manager as pm\n"
        "links, _ = pm._get_extra_operators_links_plugins()\n"
        "apps, _ = pm.get_fastapi_plugins()\n"
        "print(json.dumps({'links': sorted(l.name for l in links),\n"
        "                  'apps': [a['url_prefix'] for a in apps]}))\n"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "SD_PIPELINE_HOME": str(home),
    }
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["links"] == sorted(LINK_NAMES.values())
    assert loaded["apps"] == ["/sd-pipeline"]
