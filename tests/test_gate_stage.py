"""The gate on real dataset versions: data card, bias, drift between versions, privacy,
and a failing gate run by Airflow itself that leaves LATEST untouched."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from airflow_stack import dags_env
from PIL import Image

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.shards import ShardSample, read_shard, write_shard
from sd_pipeline.ingest.versions import latest_key, version_prefix
from sd_pipeline.quality.privacy import check_shards, embedded_metadata
from sd_pipeline.quality.safety import build_tiny_safety_classifier
from sd_pipeline.stages import QualityGateFailed, validate
from sd_pipeline.storage import Store
from sd_pipeline.synthetic import generate_shapes_dataset

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, raw: Path, **quality: object):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "storage": {"root": f"file://{tmp_path}/store"},
            "dataset": {"source": {"uri": f"file://{raw}"}},
            "quality": {"min_rows": 20, "allowed_licenses": ["cc0-1.0"], **quality},
        }
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("raw") / "shapes", count=60)


def test_passing_version_gets_a_data_card_with_the_figures(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    version = ingest(cfg)["version"]
    verdict = validate(cfg, version)
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix("shapes", version)
    card = store.get_bytes(f"{prefix}/DATACARD.md").decode()
    assert "**PASSED**" in card and "license: cc0-1.0" in card
    assert "| 68 | 60 | 8 |" in card  # inputs, accepted, quarantined
    assert "| `near_duplicate` | 1 |" in card
    assert "found metadata in 0" in card
    assert "drift: skipped" in card
    assert "`min_rows=20`" in card  # a relaxed threshold is recorded
    assert verdict["overrides"]["min_rows"] == 20
    assert verdict["privacy"]["sampled"] > 0 and verdict["privacy"]["leaks"] == 0
    assert store.exists(f"{prefix}/quality/data_docs/index.html") or store.list(f"{prefix}/quality/data_docs")


def test_second_version_is_compared_with_the_first(
    tmp_path: Path, raw: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cfg = _config(tmp_path, raw)
    first = ingest(cfg)["version"]
    validate(cfg, first)
    # A second delivery whose captions suddenly talk about people, and are much longer.
    other = generate_shapes_dataset(tmp_path_factory.mktemp("raw2") / "shapes", count=60, seed=7)
    lines = [json.loads(x) for x in (other / "metadata.jsonl").read_text().splitlines()[:60]]
    for i, row in enumerate(lines):
        row["text"] = f"a woman holding {row['text']} in a sunny park" if i % 2 else row["text"]
    (other / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    cfg2 = _config(tmp_path, other, max_drift=0.2)
    second = ingest(cfg2)["version"]
    with pytest.raises(QualityGateFailed, match="caption_length_drift"):
        validate(cfg2, second)
    store = Store.from_uri(cfg.storage.root)
    assert store.read_pointer(latest_key("shapes")) == first
    bias = store.get_json(f"{version_prefix('shapes', second)}/quality/bias.json")
    assert bias["previous_version"] == first
    assert bias["groups"]["gender_female"]["captions"] == 30
    assert bias["groups"]["gender_female"]["share_change_pp"] == pytest.approx(50.0)
    # Relaxing the threshold through config lets it pass, and that is recorded.
    verdict = validate(_config(tmp_path, other, max_drift=2.0), second)
    assert verdict["overrides"]["max_drift"] == 2.0
    assert store.read_pointer(latest_key("shapes")) == second
    assert not store.exists(f"{version_prefix('shapes', second)}/REJECTED")


def test_privacy_check_finds_metadata_planted_in_a_shard(tmp_path: Path, raw: Path) -> None:
    cfg = _config(tmp_path, raw)
    version = ingest(cfg)["version"]
    store = Store.from_uri(cfg.storage.root)
    shard_key = store.list(f"{version_prefix('shapes', version)}/shards/")[0]
    samples = list(read_shard(store.get_bytes(shard_key)))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    buf = io.BytesIO()
    Image.open(io.BytesIO(samples[0].image)).save(buf, format="JPEG", exif=exif)
    assert embedded_metadata(buf.getvalue())
    samples[0] = ShardSample(samples[0].key, buf.getvalue(), samples[0].caption, samples[0].meta)
    store.put_bytes(shard_key, write_shard(samples))
    found = check_shards(store, "shapes", version, sample=1000)
    assert found["leaks"] == 1 and found["examples"][0]["key"] == samples[0].key
    with pytest.raises(QualityGateFailed, match="privacy_leaks"):
        validate(cfg, version)


@pytest.mark.slow
def test_airflow_stops_the_ingest_dag_on_a_failed_gate(home: Path) -> None:
    """sd_ingest run by Airflow: the gate task fails, names the expectation, LATEST stays unset."""
    config = home / "strict.yaml"
    config.write_text(
        (REPO / "configs" / "demo.yaml").read_text().replace("min_rows: 100", "min_rows: 100000")
    )
    env = dags_env(home, config)
    bin_dir = Path(sys.executable).parent
    generate_shapes_dataset(home / "raw" / "shapes", count=60)
    build_tiny_safety_classifier(home / "models" / "safety-tiny")
    subprocess.run([str(bin_dir / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [str(bin_dir / "airflow"), "dags", "test", "sd_ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "failed its quality gate" in log and "expect_table_row_count_to_be_between" in log
    assert not (home / "store" / "datasets" / "shapes" / "LATEST").exists()
    [version] = list((home / "store" / "datasets" / "shapes" / "versions").iterdir())
    assert (version / "REJECTED").exists()
    assert (version / "quality" / "index.html").exists()
