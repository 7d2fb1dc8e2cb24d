"""Where a run stands against the pipeline's objectives (``objectives`` in the config).

An objective is a target value of one run metric (``holdout_loss`` at most 0.1,
``monitoring.gpu_hours`` at most 2). Every registered run reports each one as met, missed or
not measured, with its margin; objectives inform people and never block a promotion (that is
``registry.promote_when``'s job).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd_pipeline.config import Objective

TAG_PREFIX = "objective."


def assess(objectives: list[Objective], metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """One record per objective: ``metric, target, better, value, met, margin, note``.

    ``met`` is True/False, or None when the run did not measure the metric. ``margin`` is how
    far the value is on the good side of the target (negative: short of it).
    """
    results = []
    for o in objectives:
        value = metrics.get(o.metric)
        record: dict[str, Any] = {"metric": o.metric, "target": o.target, "better": o.better}
        if value is None:
            record.update(value=None, met=None, margin=None,
                          note=f"{o.metric} was not measured by this run")
        else:
            margin = (o.target - value) if o.better == "lower" else (value - o.target)
            met = margin >= 0
            sign = "<=" if o.better == "lower" else ">="
            record.update(value=float(value), met=met, margin=margin,
                          note=f"{o.metric} {value:.6g} {'meets' if met else 'misses'} "
                               f"{sign} {o.target:g} (margin {margin:+.4g})")
        results.append(record)
    return results


def summary(results: list[dict[str, Any]]) -> str:
    """``2 of 3 objectives met; missed: clip_score; not measured: fd_clip`` (or no objectives)."""
    if not results:
        return "no objectives set"
    met = [r["metric"] for r in results if r["met"] is True]
    missed = [r["metric"] for r in results if r["met"] is False]
    unmeasured = [r["metric"] for r in results if r["met"] is None]
    text = f"{len(met)} of {len(results)} objectives met"
    if missed:
        text += f"; missed: {', '.join(missed)}"
    if unmeasured:
        text += f"; not measured: {', '.join(unmeasured)}"
    return text


def mlflow_records(results: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics (``objective.<m>.target``, ``.margin``) and tags (``objective.<m>.met``:
    true, false or unmeasured; ``objective.<m>.target``), plus ``objectives.met`` ("2/3")."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for r in results:
        key = f"{TAG_PREFIX}{r['metric']}"
        tags[f"{key}.met"] = "unmeasured" if r["met"] is None else str(r["met"]).lower()
        tags[f"{key}.target"] = f"{r['better']} {r['target']:g}"
        metrics[f"{key}.target"] = float(r["target"])
        if r["margin"] is not None:
            metrics[f"{key}.margin"] = float(r["margin"])
    if results:
        tags["objectives.met"] = f"{sum(r['met'] is True for r in results)}/{len(results)}"
    return metrics, tags


def card_section(results: list[dict[str, Any]]) -> list[str]:
    """The model card's "Objectives" section (empty when none are set)."""
    if not results:
        return []
    lines = ["## Objectives", "", summary(results) + ".", "",
             "| metric | target | this version | met |", "|---|---|---|---|"]
    for r in results:
        sign = "≤" if r["better"] == "lower" else "≥"
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        met = {True: "yes", False: "no", None: "not measured"}[r["met"]]
        lines.append(f"| {r['metric']} | {sign} {r['target']:g} | {value} | {met} |")
    return [*lines, ""]
