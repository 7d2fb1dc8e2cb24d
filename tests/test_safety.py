"""Unsafe content: the caption blocklist and the image classifier, through real ingestion."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sd_pipeline.config import parse_config
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.quality.safety import (
    ImageSafetyClassifier,
    blocklisted_term,
    build_tiny_safety_classifier,
)
from sd_pipeline.storage import Store
from sd_pipeline.synthetic import generate_shapes_dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = generate_shapes_dataset(tmp_path_factory.mktemp("raw") / "shapes", count=40)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["text"] = "a NUDE red circle on a blue background"
    lines[3] = json.dumps(row)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_safety_classifier(tmp_path_factory.mktemp("clf") / "safety-tiny")


def _frames(cfg):  # type: ignore[no-untyped-def]
    summary = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix(cfg.dataset.name, summary["version"])
    read = lambda name: pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/{name}.parquet"))).to_pandas()  # noqa: E731
    return summary, read("manifest"), read("quarantine")


def _cfg(tmp_path: Path, raw: Path, **safety: object):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "storage": {"root": f"file://{tmp_path}/store"},
            "dataset": {"source": {"uri": f"file://{raw}"}},
            "safety": safety,
        }
    )


@pytest.mark.parametrize(
    "caption, hit",
    [
        ("a NUDE figure", "nude"),
        ("gore-free photo", None),
        ("a nudelman sign", None),
        ("porn", "porn"),
        ("a red circle", None),
    ],
)
def test_blocklist_matches_whole_words_in_any_case(caption: str, hit: str | None) -> None:
    assert blocklisted_term(caption, ["nude", "gore", "porn"]) == hit


def test_blocklisted_caption_is_quarantined_with_its_term(tmp_path: Path, raw: Path) -> None:
    _, manifest, quarantine = _frames(_cfg(tmp_path, raw))
    row = quarantine[quarantine["reason"] == "unsafe_caption"]
    assert len(row) == 1 and "'nude'" in row["detail"].iloc[0]
    assert not manifest["caption"].str.contains("NUDE").any()
    assert manifest["unsafe_score"].isna().all()  # no classifier configured


def test_flag_action_keeps_the_row_marked_unsafe(tmp_path: Path, raw: Path) -> None:
    _, manifest, quarantine = _frames(_cfg(tmp_path, raw, action="flag"))
    assert "unsafe_caption" not in set(quarantine["reason"])
    flagged = manifest[manifest["unsafe"]]
    assert list(flagged["caption"]) == ["a NUDE red circle on a blue background"]


def test_classifier_scores_every_image_and_acts_on_the_threshold(
    tmp_path: Path, raw: Path, classifier_dir: Path
) -> None:
    # Threshold 0 marks everything: proves each accepted image went through the model.
    summary, manifest, quarantine = _frames(
        _cfg(tmp_path, raw, classifier=str(classifier_dir), threshold=0.0, action="flag")
    )
    assert manifest["unsafe_score"].between(0, 1).all() and manifest["unsafe"].all()
    summary, manifest, quarantine = _frames(
        _cfg(tmp_path / "q", raw, classifier=str(classifier_dir), threshold=0.0)
    )
    assert manifest.empty
    assert (quarantine["reason"] == "unsafe_image").sum() == summary["inputs"] - (
        quarantine["reason"] != "unsafe_image"
    ).sum()


def test_classifier_refuses_labels_it_does_not_have(classifier_dir: Path) -> None:
    with pytest.raises(ValueError, match="none of which is in safety.unsafe_labels"):
        ImageSafetyClassifier(classifier_dir, ["violence"])
