"""The quality gate: validate a manifest with Great Expectations and publish the report.

``validate_manifest`` runs the suite from ``suite.py`` in an ephemeral GX context on a
pandas dataframe and returns a ``GateResult`` that names every failed expectation with
what was observed and what was expected. ``write_quality_report`` stores the raw GX result
and the HTML pages a person opens under ``<version prefix>/quality/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline.config import QualityConfig
from sd_pipeline.quality.suite import (
    ROW_ID_COLUMN,
    GateContext,
    build_suite,
    prepare_frame,
    quarantine_rate,
    skipped_rules,
)
from sd_pipeline.storage import Store

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("sd_pipeline.quality")

MAX_EXAMPLES = 5
DATASET_FIGURES = (
    "near_duplicate_rate",
    "unsafe_rate",
    "caption_length_drift",
    "image_side_drift",
    "privacy_leaks",
)
# kwargs that say which data was checked rather than what was expected of it.
_NOT_EXPECTED = {"batch_id", "column", "result_format"}


@dataclass
class GateResult:
    """What the gate decided and why; everything but ``summary`` is JSON-able.

    ``failures`` holds one record per failed expectation: ``expectation``, ``column``,
    ``observed``, ``expected`` (its thresholds), ``unexpected_count`` and ``examples`` (a few
    offending values with their row ``key``). ``results_json`` is GX's own result dict.
    """

    passed: bool
    failures: list[dict[str, Any]]
    statistics: dict[str, Any]
    results_json: dict[str, Any] = field(repr=False)

    def summary(self) -> str:
        s = self.statistics
        head = (
            f"quality gate {'PASSED' if self.passed else 'FAILED'}: "
            f"{s['successful_expectations']}/{s['evaluated_expectations']} expectations met "
            f"on {s['rows']} rows ({s['quarantined']} quarantined, "
            f"rate {s['quarantine_rate']:.3f})"
        )
        lines = [head]
        for f in self.failures:
            target = f"({f['column']})" if f["column"] else ""
            expected = ", ".join(f"{k}={v}" for k, v in f["expected"].items())
            lines.append(
                f"  FAILED {f['expectation']}{target}: observed {f['observed']}"
                + (f"; expected {expected}" if expected else "")
            )
            if f["examples"]:
                lines.append(f"    examples: {f['examples']}")
        return "\n".join(lines)


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        count, rows = result["unexpected_count"], result.get("element_count") or 0
        pct = 100.0 * count / rows if rows else 0.0
        return f"{count} of {rows} rows unexpected ({pct:.1f}%)"
    return None


def expectation_records(results_json: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain record per expectation of a GX validation result dict, in suite order."""
    records = []
    for r in results_json["results"]:
        config = r["expectation_config"]
        kwargs = config["kwargs"]
        result = r.get("result") or {}
        exception = r.get("exception_info") or {}
        observed = _observed(result)
        if exception.get("raised_exception"):
            observed = f"error: {exception.get('exception_message')}"
        examples = result.get("partial_unexpected_index_list") or result.get("partial_unexpected_list", [])
        records.append(
            {
                "expectation": config["type"],
                "column": kwargs.get("column"),
                "success": bool(r["success"]),
                "observed": observed,
                "expected": {k: v for k, v in kwargs.items() if k not in _NOT_EXPECTED},
                "unexpected_count": result.get("unexpected_count"),
                "examples": list(examples)[:MAX_EXAMPLES],
            }
        )
    return records


def validate_manifest(
    manifest: pd.DataFrame, quarantined: int | GateContext, cfg: QualityConfig
) -> GateResult:
    """Run the manifest suite on ``manifest``.

    ``quarantined`` is the count of rejected inputs, or a ``GateContext`` that also carries
    the quarantine reasons, the previous accepted manifest and the privacy sample result.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = prepare_frame(manifest, quarantined)
    context = gx.get_context(mode="ephemeral")
    # Metric progress bars are noise in task logs for a check that takes about a second.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole_manifest")
    )
    suite = context.suites.add(build_suite(cfg, frame))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest_gate", data=batch, suite=suite)
    )
    id_columns = [ROW_ID_COLUMN] if ROW_ID_COLUMN in frame.columns else []
    result = validation.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": MAX_EXAMPLES,
            "unexpected_index_column_names": id_columns,
        },
    )
    results_json = result.to_json_dict()
    statistics = dict(results_json["statistics"])
    ctx = quarantined if isinstance(quarantined, GateContext) else GateContext(quarantined)
    statistics.update(
        rows=len(frame),
        quarantined=ctx.quarantined,
        quarantine_rate=quarantine_rate(len(frame), ctx.quarantined),
        notes=skipped_rules(cfg, frame),
    )
    for name in DATASET_FIGURES:
        if name in frame.columns and len(frame):
            statistics[name] = float(frame[name].iloc[0])
    gate = GateResult(
        passed=bool(result.success),
        failures=[r for r in expectation_records(results_json) if not r["success"]],
        statistics=statistics,
        results_json=results_json,
    )
    log.info(
        "quality gate %s: %d/%d expectations met, %d rows, quarantine rate %.3f",
        "passed" if gate.passed else "failed",
        statistics["successful_expectations"],
        statistics["evaluated_expectations"],
        statistics["rows"],
        statistics["quarantine_rate"],
    )
    return gate


def write_quality_report(store: Store, prefix: str, result: GateResult) -> dict[str, str]:
    """Store ``validation.json``, GX Data Docs and an ``index.html`` under ``<prefix>/quality/``.

    ``index.html`` is a self-contained summary (it opens offline) that links to the GX Data
    Docs page of the same validation for the full detail.
    """
    from sd_pipeline.quality.report import build_data_docs, render_index_html

    base = f"{prefix.rstrip('/')}/quality"
    validation_key = f"{base}/validation.json"
    store.put_json(
        validation_key,
        {
            "passed": result.passed,
            "statistics": result.statistics,
            "failures": result.failures,
            "gx_result": result.results_json,
        },
    )
    with tempfile.TemporaryDirectory(prefix="sd-pipeline-datadocs-") as tmp:
        site = Path(tmp)
        page = build_data_docs(result.results_json, site)
        for path in sorted(site.rglob("*")):
            rel = path.relative_to(site).as_posix()
            if path.is_file() and _is_site_file(rel):
                store.put_file(f"{base}/data_docs/{rel}", path)
        page_rel = f"data_docs/{page.relative_to(site).as_posix()}"
    # index.html last: its presence means the pages it links to are there.
    report_key = f"{base}/index.html"
    store.put_bytes(report_key, render_index_html(result, data_docs_page=page_rel).encode())
    return {"validation_uri": store.uri(validation_key), "report_uri": store.uri(report_key)}


def _is_site_file(rel: str) -> bool:
    # GX copies ~3.5 MB of walkthrough GIFs and logos that no page of ours shows.
    return not rel.startswith("static/images/") or rel.endswith("favicon.ico")
