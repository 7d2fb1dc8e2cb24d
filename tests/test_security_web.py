"""The report app on the Airflow API server's origin: what a dataset can put in a page, and who
may read one.

A dataset version is ingested for real with a hostile licence and caption in its metadata, the
gate renders the Data Docs with Great Expectations, and every page is fetched through the
plugin's report app.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from airflow_stack import airflow_stack
from fastapi.testclient import TestClient

from sd_pipeline.airflow.store_app import create_app
from sd_pipeline.config import PipelineConfig, parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.stages import QualityGateFailed, validate
from sd_pipeline.storage import Store
from sd_pipeline.synthetic import generate_shapes_dataset

HOSTILE_LICENSE = "<img src=x onerror=alert(1)>"
HOSTILE_CAPTION = '<script>alert("caption")</script><svg onload=alert(2)> ' + "a long caption " * 8
# What a browser would run if any of it came through as markup.
RAW = ("<img src=x onerror", "<script>alert(", "<svg onload")


@pytest.fixture(scope="module")
def hostile_version(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, str]:
    """A committed, gated (and rejected) version whose metadata carries markup."""
    tmp = tmp_path_factory.mktemp("hostile")
    raw = generate_shapes_dataset(tmp / "raw", count=24)
    lines = (raw / "metadata.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    lines[0] = json.dumps({**first, "license": HOSTILE_LICENSE})
    lines[1] = json.dumps({**second, "text": HOSTILE_CAPTION})
    (raw / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = parse_config(
        {
            "storage": {"root": f"file://{tmp}/store"},
            "dataset": {"source": {"uri": f"file://{raw}"}},
            # Both hostile rows fail a rule, so GX lists them among the unexpected values.
            "quality": {"min_rows": 10, "allowed_licenses": ["cc0-1.0"], "caption_max_chars": 80},
        }
    )
    version = str(ingest(cfg)["version"])
    with pytest.raises(QualityGateFailed):
        validate(cfg, version)
    return cfg, version


def anyone() -> None:
    """Lets every request through, for the tests of what a page holds; who may read is tested
    against a real API server at the end of this file."""


def _pages(store: Store, prefix: str) -> list[str]:
    return [k for k in store.list(f"{prefix}/quality") if k.endswith(".html")]


def test_data_docs_show_hostile_values_as_text_and_load_nothing_from_elsewhere(
    hostile_version: tuple[PipelineConfig, str],
) -> None:
    cfg, version = hostile_version
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix(cfg.dataset.name, version)
    pages = _pages(store, prefix)
    assert any("/data_docs/validations/" in k for k in pages), pages
    client = TestClient(create_app(lambda: store, authorize=anyone))
    shown = 0
    for key in pages:
        page = client.get(f"/store/{key}")
        assert page.status_code == 200, key
        assert page.headers["content-security-policy"] == "sandbox"  # no scripts, opaque origin
        assert page.headers["x-content-type-options"] == "nosniff"
        text = page.text
        for raw in RAW:
            assert raw not in text, f"{raw!r} reaches {key} unescaped"
        assert not re.search(r"<script\b[^>]*\bsrc=", text, re.I), f"{key} loads a script"
        assert not re.search(r"<(link|img)\b[^>]*\b(href|src)=[\"']?(https?:)?//", text, re.I), (
            f"{key} loads from another origin"
        )
        shown += "&lt;img src=x onerror=alert(1)&gt;" in text
    # Still readable without scripts: the values are there as text, on the summary and on GX's
    # validation page, and the Data Docs home links to that page (GX's fills a table by script).
    assert shown >= 2
    validation = next(k for k in pages if "/data_docs/validations/" in k)
    page = client.get(f"/store/{validation}").text
    assert "values must belong to this set" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    home = client.get(f"/store/{prefix}/quality/data_docs/index.html").text
    assert validation.split("/data_docs/", 1)[1] in home


def test_every_object_the_app_serves_is_sandboxed(hostile_version: tuple[PipelineConfig, str]) -> None:
    cfg, version = hostile_version
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix(cfg.dataset.name, version)
    client = TestClient(create_app(lambda: store, authorize=anyone))
    for key in (f"{prefix}/DATACARD.md", f"{prefix}/quality/validation.json"):
        got = client.get(f"/store/{key}")
        assert got.status_code == 200, key
        assert got.headers["content-security-policy"] == "sandbox"
        assert got.headers["x-content-type-options"] == "nosniff"


# -- who may read: Airflow's own users, as its UI and REST API check them -----------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read().decode()


@pytest.mark.slow
def test_the_report_app_in_airflow_serves_airflow_users_only(
    home: Path, hostile_version: tuple[PipelineConfig, str]
) -> None:
    """The plugin mounted in a real API server with the simple auth manager: no token, no page."""
    cfg, version = hostile_version
    config = home / "pipeline.yaml"
    config.write_text(f"storage:\n  root: {cfg.storage.root}\n")
    report = f"/sd-pipeline/store/{version_prefix(cfg.dataset.name, version)}/quality/index.html"
    with airflow_stack(
        home, services=("api-server",), extra_env={"SD_PIPELINE_CONFIG": str(config)}
    ) as stack:
        url = stack.url + report
        status, _, body = _get(url, {})
        assert status == 401, body  # nobody: refused, and told to authenticate
        assert "Quality gate" not in body
        assert _get(url, {"Authorization": "Bearer not-a-jwt"})[0] in (401, 403)
        assert _get(url, {"Cookie": "_token=not-a-jwt"})[0] in (401, 403)
        # A script, with a token from POST /auth/token; the UI, with the same JWT in its cookie.
        for headers in ({"Authorization": f"Bearer {stack.token()}"}, {"Cookie": f"_token={stack.token()}"}):
            status, got, body = _get(url, headers)
            assert status == 200 and "Quality gate <span" in body, (headers, status, body[:300])
            assert got["content-security-policy"] == "sandbox"
            assert got["x-content-type-options"] == "nosniff"
