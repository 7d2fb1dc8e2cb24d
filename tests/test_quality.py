"""The quality gate, run for real with Great Expectations on small manifests."""

from __future__ import annotations

import hashlib
import json

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("great_expectations")

from sd_pipeline.config import QualityConfig  # noqa: E402
from sd_pipeline.quality.gate import GateResult, validate_manifest, write_quality_report  # noqa: E402
from sd_pipeline.storage import Store  # noqa: E402

CFG = QualityConfig(
    min_rows=10, caption_min_chars=3, caption_max_chars=80, min_side=16, max_quarantine_rate=0.2
)


def manifest(rows: int = 12) -> pd.DataFrame:
    keys = [hashlib.sha256(f"img-{i}".encode()).hexdigest()[:16] for i in range(rows)]
    return pd.DataFrame(
        {
            "key": keys,
            "shard": [f"shard-{i // 8:06d}" for i in range(rows)],
            "split": ["holdout" if i % 10 == 0 else "train" for i in range(rows)],
            "source": [f"images/{i:04d}.png" for i in range(rows)],
            "caption": [f"a red circle number {i}" for i in range(rows)],
            "sha256": [hashlib.sha256(f"pixels-{i}".encode()).hexdigest() for i in range(rows)],
            "width": [64] * rows,
            "height": [64] * rows,
            "orig_width": [256] * rows,
            "orig_height": [192] * rows,
        }
    )


def failed(result: GateResult) -> set[tuple[str, str | None]]:
    return {(f["expectation"], f["column"]) for f in result.failures}


def test_good_manifest_passes() -> None:
    result = validate_manifest(manifest(), quarantined=1, cfg=CFG)

    assert result.passed, result.summary()
    assert result.failures == []
    assert result.statistics["evaluated_expectations"] == 11  # 8 row rules + aspect, near-dup, unsafe
    assert result.statistics["quarantine_rate"] == pytest.approx(1 / 13)
    assert result.results_json["success"] is True
    assert "PASSED" in result.summary()


def test_too_few_rows_fails_on_row_count() -> None:
    result = validate_manifest(manifest(rows=4), quarantined=0, cfg=CFG)

    assert not result.passed
    assert failed(result) == {("expect_table_row_count_to_be_between", None)}
    [failure] = result.failures
    assert failure["observed"] == 4
    assert failure["expected"]["min_value"] == 10
    assert "expect_table_row_count_to_be_between" in result.summary()
    assert "observed 4" in result.summary()


def test_duplicate_sha256_fails_and_names_the_rows() -> None:
    m = manifest()
    m.loc[5, "sha256"] = m.loc[2, "sha256"]

    result = validate_manifest(m, quarantined=0, cfg=CFG)

    assert failed(result) == {("expect_column_values_to_be_unique", "sha256")}
    [failure] = result.failures
    assert failure["unexpected_count"] == 2
    assert {e["key"] for e in failure["examples"]} == {m.loc[2, "key"], m.loc[5, "key"]}
    assert "expect_column_values_to_be_unique(sha256)" in result.summary()


def test_whitespace_only_and_missing_captions_fail() -> None:
    m = manifest()
    m.loc[3, "caption"] = "   \t "
    m.loc[4, "caption"] = None

    result = validate_manifest(m, quarantined=0, cfg=CFG)

    assert failed(result) == {
        ("expect_column_value_lengths_to_be_between", "caption_stripped"),
        ("expect_column_values_to_not_be_null", "caption"),
    }
    lengths = next(f for f in result.failures if f["column"] == "caption_stripped")
    assert lengths["examples"] == [{"caption_stripped": "", "key": m.loc[3, "key"]}]


def test_small_images_fail_on_min_side() -> None:
    m = manifest()
    m.loc[7, "height"] = 8

    result = validate_manifest(m, quarantined=0, cfg=CFG)

    assert failed(result) == {("expect_column_values_to_be_between", "height")}


def test_high_quarantine_rate_fails() -> None:
    result = validate_manifest(manifest(), quarantined=6, cfg=CFG)  # 6 / 18 = 0.33

    assert failed(result) == {("expect_column_max_to_be_between", "quarantine_rate")}
    [failure] = result.failures
    assert failure["observed"] == pytest.approx(1 / 3)
    assert failure["expected"]["max_value"] == 0.2
    assert "quarantine_rate" in result.summary()


def test_missing_column_is_refused_with_the_columns_named() -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sha256'\]"):
        validate_manifest(manifest().drop(columns=["sha256"]), quarantined=0, cfg=CFG)


def test_report_is_written_to_the_store(tmp_path) -> None:
    m = manifest()
    m.loc[1, "sha256"] = m.loc[0, "sha256"]
    result = validate_manifest(m, quarantined=5, cfg=CFG)
    store = Store.from_uri(f"file://{tmp_path}/store")
    prefix = "datasets/shapes/versions/abc123"

    uris = write_quality_report(store, prefix, result)

    assert uris == {
        "validation_uri": store.uri(f"{prefix}/quality/validation.json"),
        "report_uri": store.uri(f"{prefix}/quality/index.html"),
    }
    stored = store.get_json(f"{prefix}/quality/validation.json")
    assert stored["passed"] is False
    assert stored["gx_result"]["statistics"]["unsuccessful_expectations"] == 2
    index = store.get_bytes(f"{prefix}/quality/index.html").decode()
    for record in result.results_json["results"]:
        assert record["expectation_config"]["type"] in index
    assert "FAILED" in index
    # The summary links to GX's own Data Docs page, which is in the store too.
    link = index.split('href="', 1)[1].split('"', 1)[0]
    assert link.startswith("data_docs/validations/")
    page = store.get_bytes(f"{prefix}/quality/{link}").decode()
    assert "manifest_quality" in page and "quarantine_rate" in page
    assert store.exists(f"{prefix}/quality/data_docs/index.html")
    json.dumps(result.failures)  # failures stay JSON-able for task results


# -- the dataset-level families: aspect ratio, near duplicates, unsafe, licences, drift, privacy


from sd_pipeline.quality.suite import GateContext  # noqa: E402

MAX = "expect_column_max_to_be_between"


def test_extreme_aspect_ratio_fails_naming_the_row() -> None:
    m = manifest()
    m.loc[3, ["orig_width", "orig_height"]] = [1000, 100]
    result = validate_manifest(m, quarantined=0, cfg=CFG.model_copy(update={"max_aspect_ratio": 3.0}))
    assert failed(result) == {("expect_column_values_to_be_between", "aspect_ratio")}
    assert m.loc[3, "key"] in json.dumps(result.failures)


def test_near_duplicate_and_unsafe_rates_come_from_reasons_and_flags() -> None:
    m = manifest()
    m["unsafe"] = [i < 2 for i in range(12)]  # 2 flagged rows
    ctx = GateContext(quarantined=4, reasons={"near_duplicate": 3, "unsafe_image": 1})
    cfg = CFG.model_copy(update={"max_near_duplicate_rate": 0.1, "max_unsafe_rate": 0.1,
                                 "max_quarantine_rate": 0.5})
    result = validate_manifest(m, ctx, cfg)
    assert failed(result) == {(MAX, "near_duplicate_rate"), (MAX, "unsafe_rate")}
    assert result.statistics["near_duplicate_rate"] == pytest.approx(3 / 16)
    assert result.statistics["unsafe_rate"] == pytest.approx(3 / 16)


def test_licences_outside_the_allowed_set_fail_and_a_missing_column_is_noted() -> None:
    cfg = CFG.model_copy(update={"allowed_licenses": ["cc-by-4.0", "cc0-1.0"]})
    m = manifest()
    noted = validate_manifest(m, quarantined=0, cfg=cfg)
    assert noted.passed and any("licences: skipped" in n for n in noted.statistics["notes"])
    m["meta_license"] = ["cc-by-4.0"] * 11 + ["all-rights-reserved"]
    result = validate_manifest(m, quarantined=0, cfg=cfg)
    assert failed(result) == {("expect_column_values_to_be_in_set", "meta_license")}
    assert "all-rights-reserved" in json.dumps(result.failures)


def test_drift_against_the_previous_version_is_checked_or_skipped_with_a_note() -> None:
    first = validate_manifest(manifest(), quarantined=0, cfg=CFG)
    assert any(n.startswith("drift: skipped") for n in first.statistics["notes"])
    previous = manifest()
    similar = manifest()
    assert validate_manifest(similar, GateContext(0, previous=previous), CFG).passed
    longer = manifest()
    longer["caption"] = longer["caption"] + " beside a small blue square"
    bigger = manifest()
    bigger[["orig_width", "orig_height"]] = [2048, 1536]
    assert failed(validate_manifest(longer, GateContext(0, previous=previous), CFG)) == {
        (MAX, "caption_length_drift")}
    assert failed(validate_manifest(bigger, GateContext(0, previous=previous), CFG)) == {
        (MAX, "image_side_drift")}


def test_privacy_leaks_fail_the_gate() -> None:
    result = validate_manifest(manifest(), GateContext(0, privacy_leaks=2), CFG)
    assert failed(result) == {(MAX, "privacy_leaks")}
    assert validate_manifest(manifest(), GateContext(0, privacy_leaks=0), CFG).passed
