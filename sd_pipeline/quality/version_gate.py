"""Gate one dataset version: gather what the gate needs, validate, publish what it found.

Reads the version's manifest and quarantine, the previous accepted version (for drift
and the bias comparison) and a sample of its shard images (privacy); runs the GX suite;
writes ``quality/`` (GX JSON, Data Docs, index.html, bias.json, verdict.json) and
``DATACARD.md``. Moving ``LATEST`` is left to the caller.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from sd_pipeline.config import PipelineConfig, QualityConfig
from sd_pipeline.ingest.versions import latest_key, version_prefix
from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.quality")


def _parquet(store: Store, key: str):  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get_bytes(key))).to_pandas()


def threshold_overrides(cfg: QualityConfig) -> dict[str, Any]:
    """Quality thresholds that differ from the defaults: recorded in the version's lineage."""
    defaults = QualityConfig().model_dump(mode="json")
    return {k: v for k, v in cfg.model_dump(mode="json").items() if defaults.get(k) != v}


def gate_version(config: PipelineConfig, store: Store, version: str) -> tuple[dict[str, Any], str]:
    """Validate ``version`` and publish its report and data card; returns (verdict, summary)."""
    from sd_pipeline.quality.bias import compare, term_group_counts
    from sd_pipeline.quality.datacard import render_datacard
    from sd_pipeline.quality.gate import validate_manifest, write_quality_report
    from sd_pipeline.quality.privacy import check_shards
    from sd_pipeline.quality.suite import GateContext

    ds, q = config.dataset, config.quality
    prefix = version_prefix(ds.name, version)
    manifest = _parquet(store, f"{prefix}/manifest.parquet")
    quarantine = _parquet(store, f"{prefix}/quarantine.parquet")
    previous_id = store.read_pointer(latest_key(ds.name))
    previous = previous_bias = None
    if previous_id and previous_id != version:
        previous_prefix = version_prefix(ds.name, previous_id)
        previous = _parquet(store, f"{previous_prefix}/manifest.parquet")
        if store.exists(f"{previous_prefix}/quality/bias.json"):
            previous_bias = store.get_json(f"{previous_prefix}/quality/bias.json")["groups"]
    privacy = check_shards(store, ds.name, version, q.privacy_sample)
    ctx = GateContext(
        quarantined=len(quarantine),
        reasons=quarantine["reason"].value_counts().to_dict(),
        previous=previous,
        privacy_leaks=privacy["leaks"] if privacy["sampled"] else None,
    )
    result = validate_manifest(manifest, ctx, q)
    report = write_quality_report(store, prefix, result)
    captions = manifest["caption"].tolist()
    bias = compare(term_group_counts(captions, q.bias_terms), previous_bias)
    store.put_json(f"{prefix}/quality/bias.json", {"groups": bias, "previous_version": previous_id})
    verdict = {
        "dataset": ds.name,
        "version": version,
        "passed": result.passed,
        "failures": [f["expectation"] for f in result.failures],
        "failure_details": [
            {k: f.get(k) for k in ("expectation", "column", "observed")} for f in result.failures
        ],
        "notes": result.statistics.get("notes", []),
        "statistics": {k: v for k, v in result.statistics.items() if k != "notes"},
        "thresholds": q.model_dump(mode="json"),
        "overrides": threshold_overrides(q),
        "previous_version": previous_id if previous_id != version else None,
        "privacy": privacy,
        "datacard_uri": store.uri(f"{prefix}/DATACARD.md"),
        **report,
    }
    ingest_summary = store.get_json(f"{prefix}/ingest.json")
    card = render_datacard(
        dataset=ds.name,
        version=version,
        ingest=ingest_summary,
        manifest=manifest,
        verdict=verdict,
        bias=bias,
        privacy=privacy,
        safety=config.safety.model_dump(mode="json"),
    )
    store.put_bytes(f"{prefix}/DATACARD.md", card.encode())
    store.put_json(f"{prefix}/quality/verdict.json", verdict)  # last: it names the card
    log.info("%s", result.summary())
    return verdict, result.summary()
