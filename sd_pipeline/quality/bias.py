"""Bias report: how often configured term groups appear in captions, against the last version.

Counting words is a coarse signal, not a fairness audit; it shows a team what their
captions talk about and when that shifts between versions.
"""

from __future__ import annotations

import re
from typing import Any


def _pattern(terms: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t.lower()) for t in terms if t.strip())
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def term_group_counts(captions: list[str], groups: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """For each group: captions mentioning any of its terms, and their share of all captions."""
    total = len(captions)
    report: dict[str, dict[str, Any]] = {}
    for group, terms in sorted(groups.items()):
        if not terms:
            continue
        pattern = _pattern(terms)
        count = sum(1 for c in captions if isinstance(c, str) and pattern.search(c))
        report[group] = {"captions": count, "share": count / total if total else 0.0}
    return report


def compare(current: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Add each group's share change (percentage points) against the previous version."""
    out: dict[str, Any] = {}
    for group, figures in current.items():
        before = (previous or {}).get(group)
        out[group] = {
            **figures,
            "previous_share": before["share"] if before else None,
            "share_change_pp": 100 * (figures["share"] - before["share"]) if before else None,
        }
    return out
