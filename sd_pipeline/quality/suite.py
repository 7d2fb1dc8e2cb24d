"""The manifest expectation suite, written as code from ``QualityConfig``.

GX checks columns, so values the manifest does not hold are derived first:
``caption_stripped`` (whitespace-only captions become empty and fail the length check),
``aspect_ratio``, and dataset-level figures broadcast to every row (quarantine,
near-duplicate and unsafe rates, drift against the previous version, privacy leaks): the
maximum of such a column is the figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sd_pipeline.config import QualityConfig

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

SUITE_NAME = "manifest_quality"
REQUIRED_COLUMNS = ("key", "caption", "sha256", "width", "height")
# Rows are named by this column in the unexpected-value examples.
ROW_ID_COLUMN = "key"
LICENSE_COLUMN = "meta_license"  # carried metadata columns are prefixed with meta_
UNSAFE_REASONS = ("unsafe_caption", "unsafe_image")


def quarantine_rate(rows: int, quarantined: int) -> float:
    """Share of inputs that were quarantined: ``quarantined / (rows + quarantined)``."""
    if rows < 0 or quarantined < 0:
        raise ValueError(f"counts must be >= 0, got rows={rows} quarantined={quarantined}")
    total = rows + quarantined
    return quarantined / total if total else 0.0


@dataclass(frozen=True)
class GateContext:
    """What the gate knows besides the manifest: quarantine reasons, the previous accepted
    version's manifest (for drift), and the privacy sample's result."""

    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    previous: pd.DataFrame | None = None
    privacy_leaks: int | None = None


def _rate(count: int, inputs: int) -> float:
    return count / inputs if inputs else 0.0


def _relative_change(now: float, before: float) -> float:
    return abs(now - before) / before if before else (0.0 if now == before else float("inf"))


def _image_side(frame: pd.DataFrame) -> pd.Series:
    cols = ("orig_width", "orig_height") if "orig_width" in frame.columns else ("width", "height")
    return frame[list(cols)].min(axis=1)


def drift(manifest: pd.DataFrame, previous: pd.DataFrame) -> dict[str, float]:
    """Relative change of mean caption length and median image side against ``previous``."""
    return {
        "caption_length_drift": _relative_change(
            float(manifest["caption"].str.len().mean()), float(previous["caption"].str.len().mean())
        ),
        "image_side_drift": _relative_change(
            float(_image_side(manifest).median()), float(_image_side(previous).median())
        ),
    }


def prepare_frame(manifest: pd.DataFrame, ctx: GateContext | int) -> pd.DataFrame:
    """The manifest plus the derived columns the suite checks.

    Dataset-level figures (rates, drift, privacy leaks) are broadcast as constant columns
    so that GX checks them with the same machinery and they land in the same result.
    """
    if isinstance(ctx, int):
        ctx = GateContext(quarantined=ctx)
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest lacks column(s) {missing}; it has {list(manifest.columns)}. "
            "Validate the manifest.parquet written by `sd-pipeline ingest`."
        )
    frame = manifest.copy()
    inputs = len(frame) + ctx.quarantined
    # A null caption stays null here: the not-null expectation reports it, not this one.
    frame["caption_stripped"] = frame["caption"].str.strip()  # vectorised; nulls stay null
    frame["quarantine_rate"] = quarantine_rate(len(frame), ctx.quarantined)
    if {"orig_width", "orig_height"} <= set(frame.columns):
        sides = frame[["orig_width", "orig_height"]]
        frame["aspect_ratio"] = sides.max(axis=1) / sides.min(axis=1).clip(lower=1)
    frame["near_duplicate_rate"] = _rate(ctx.reasons.get("near_duplicate", 0), inputs)
    flagged = int(frame["unsafe"].sum()) if "unsafe" in frame.columns else 0
    unsafe_quarantined = sum(ctx.reasons.get(r, 0) for r in UNSAFE_REASONS)
    frame["unsafe_rate"] = _rate(flagged + unsafe_quarantined, inputs)
    if ctx.previous is not None and len(ctx.previous) and len(frame):
        for name, value in drift(frame, ctx.previous).items():
            frame[name] = value
    if ctx.privacy_leaks is not None:
        frame["privacy_leaks"] = ctx.privacy_leaks
    return frame


def build_suite(cfg: QualityConfig, frame: pd.DataFrame | None = None) -> gx.ExpectationSuite:
    """One expectation per rule of the gate; thresholds come from ``cfg``.

    Rules whose input does not exist for this dataset (no licence column, no previous
    version, no privacy sample) are left out; ``skipped_rules`` says why for the report.
    """
    import great_expectations as gx

    e = gx.expectations
    columns = set(frame.columns) if frame is not None else set()
    expectations = [
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
    ]
    if frame is None:
        return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
    if "aspect_ratio" in columns:
        expectations.append(
            e.ExpectColumnValuesToBeBetween(
                column="aspect_ratio", min_value=1.0, max_value=cfg.max_aspect_ratio
            )
        )
    expectations.append(
        e.ExpectColumnMaxToBeBetween(
            column="near_duplicate_rate", min_value=0.0, max_value=cfg.max_near_duplicate_rate
        )
    )
    expectations.append(
        e.ExpectColumnMaxToBeBetween(column="unsafe_rate", min_value=0.0, max_value=cfg.max_unsafe_rate)
    )
    if cfg.allowed_licenses is not None and LICENSE_COLUMN in columns:
        expectations.append(
            e.ExpectColumnValuesToBeInSet(column=LICENSE_COLUMN, value_set=sorted(cfg.allowed_licenses))
        )
    for name in ("caption_length_drift", "image_side_drift"):
        if name in columns:
            expectations.append(
                e.ExpectColumnMaxToBeBetween(column=name, min_value=0.0, max_value=cfg.max_drift)
            )
    if "privacy_leaks" in columns:
        expectations.append(e.ExpectColumnMaxToBeBetween(column="privacy_leaks", min_value=0, max_value=0))
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def skipped_rules(cfg: QualityConfig, frame: pd.DataFrame) -> list[str]:
    """Rules of the gate that did not run for this dataset, each with its reason."""
    notes = []
    if "caption_length_drift" not in frame.columns:
        notes.append("drift: skipped, there is no previous accepted version to compare with")
    if cfg.allowed_licenses is not None and LICENSE_COLUMN not in frame.columns:
        notes.append(f"licences: skipped, the metadata has no {LICENSE_COLUMN[5:]!r} column")
    if cfg.allowed_licenses is None:
        notes.append("licences: not checked, quality.allowed_licenses is not set")
    if "privacy_leaks" not in frame.columns:
        notes.append("privacy: skipped, quality.privacy_sample is 0")
    return notes
