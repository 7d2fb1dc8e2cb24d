"""The manifest expectation suite, written as code from ``QualityConfig``.

GX checks columns, so two values the manifest does not hold are derived first:
``caption_stripped`` (whitespace-only captions become empty and fail the length check) and
``quarantine_rate`` (the same number on every row; its maximum is the rate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sd_pipeline.config import QualityConfig

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

SUITE_NAME = "manifest_quality"
REQUIRED_COLUMNS = ("key", "caption", "sha256", "width", "height")
# Rows are named by this column in the unexpected-value examples.
ROW_ID_COLUMN = "key"


def quarantine_rate(rows: int, quarantined: int) -> float:
    """Share of inputs that were quarantined: ``quarantined / (rows + quarantined)``."""
    if rows < 0 or quarantined < 0:
        raise ValueError(f"counts must be >= 0, got rows={rows} quarantined={quarantined}")
    total = rows + quarantined
    return quarantined / total if total else 0.0


def prepare_frame(manifest: pd.DataFrame, quarantined: int) -> pd.DataFrame:
    """The manifest plus the derived columns the suite checks."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest lacks column(s) {missing}; it has {list(manifest.columns)}. "
            "Validate the manifest.parquet written by `sd-pipeline ingest`."
        )
    frame = manifest.copy()
    # A null caption stays null here: the not-null expectation reports it, not this one.
    frame["caption_stripped"] = frame["caption"].map(lambda c: c.strip() if isinstance(c, str) else None)
    frame["quarantine_rate"] = quarantine_rate(len(frame), quarantined)
    return frame


def build_suite(cfg: QualityConfig) -> gx.ExpectationSuite:
    """One expectation per rule of the gate; thresholds come from ``cfg``."""
    import great_expectations as gx

    e = gx.expectations
    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=[
            e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
            e.ExpectColumnValuesToNotBeNull(column="caption"),
            e.ExpectColumnValueLengthsToBeBetween(
                column="caption_stripped",
                min_value=cfg.caption_min_chars,
                max_value=cfg.caption_max_chars,
            ),
            e.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side),
            e.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side),
            e.ExpectColumnValuesToBeUnique(column="sha256"),
            e.ExpectColumnValuesToBeUnique(column="key"),
            e.ExpectColumnMaxToBeBetween(
                column="quarantine_rate", min_value=0.0, max_value=cfg.max_quarantine_rate
            ),
        ],
    )
