"""DATACARD.md: what a dataset version holds, how it was checked, and what to watch for.

Rendered from figures the pipeline already computed (ingest summary, manifest,
quarantine, gate verdict, bias and privacy results), in the Hugging Face dataset-card
shape: YAML front matter, then sections a reviewer reads top to bottom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def _histogram(values: pd.Series, edges: list[float], unit: str = "") -> list[str]:
    import pandas as pd

    if values.empty:
        return ["| (no rows) | 0 |"]
    bins = pd.cut(values, bins=[*edges, float("inf")], right=False, include_lowest=True)
    counts = bins.value_counts(sort=False)
    rows = []
    for interval, count in counts.items():
        hi = "∞" if interval.right == float("inf") else f"{interval.right:g}"
        rows.append(f"| {interval.left:g}–{hi}{unit} | {count} |")
    return rows


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "n>1M"


def render_datacard(
    *,
    dataset: str,
    version: str,
    ingest: dict[str, Any],
    manifest: pd.DataFrame,
    verdict: dict[str, Any],
    bias: dict[str, Any],
    privacy: dict[str, Any],
    safety: dict[str, Any],
) -> str:
    licences = (
        manifest["meta_license"].fillna("unknown").value_counts().to_dict()
        if "meta_license" in manifest.columns
        else {}
    )
    lines = [
        "---",
        f"pretty_name: {dataset} {version}",
        f"license: {'unknown' if not licences else 'other' if len(licences) > 1 else next(iter(licences))}",
        "task_categories:\n- text-to-image",
        f"size_categories:\n- {_size_category(len(manifest))}",
        f"sd_pipeline_version: {version}",
        "---",
        "",
        f"# Dataset card: {dataset} / {version}",
        "",
        f"Source `{ingest.get('source')}`, ingested into `{ingest.get('uri')}`.",
        f"Version ids are content hashes: the same input always gives `{version}`.",
        "",
        "## Quality gate",
        "",
        f"**{'PASSED' if verdict['passed'] else 'FAILED'}**"
        + (" — this version is not used by training." if not verdict["passed"] else ""),
        "",
        f"- Report: {verdict.get('report_uri')}",
        f"- Validation result (GX JSON): {verdict.get('validation_uri')}",
    ]
    for failure in verdict.get("failure_details", []):
        lines.append(
            f"- Failed `{failure['expectation']}`"
            + (f" on `{failure['column']}`" if failure.get("column") else "")
            + f": observed {failure.get('observed')}"
        )
    for note in verdict.get("notes", []):
        lines.append(f"- Note: {note}")
    overrides = verdict.get("overrides") or {}
    lines.append(
        "- Thresholds changed from the defaults: "
        + (", ".join(f"`{k}={v}`" for k, v in sorted(overrides.items())) if overrides else "none")
    )
    reasons = ingest.get("quarantine_reasons", {})
    lines += [
        "",
        "## Composition",
        "",
        "| inputs | accepted | quarantined | shards | train | holdout |",
        "|---|---|---|---|---|---|",
        f"| {ingest.get('inputs')} | {ingest.get('accepted')} | {ingest.get('quarantined')} | "
        f"{ingest.get('shards')} | {ingest.get('splits', {}).get('train', 0)} | "
        f"{ingest.get('splits', {}).get('holdout', 0)} |",
        "",
        "Quarantined inputs by reason (every rejected input is in `quarantine.parquet` with a sentence):",
        "",
        "| reason | count |",
        "|---|---|",
        *([f"| `{r}` | {n} |" for r, n in sorted(reasons.items())] or ["| (none) | 0 |"]),
        "",
        "## Images",
        "",
        (
            f"Processed to {ingest.get('processing', {}).get('resolution')} px squares (centre crop), "
            if ingest.get("processing", {}).get("crop", "center") == "center"
            else f"Resized to a shorter side of {ingest.get('processing', {}).get('resolution')} px, "
            "aspect ratio kept (dataset.crop: none), "
        )
        + "re-encoded as JPEG from pixels.",
        "",
        "Shorter side of the source images:",
        "",
        "| pixels | images |",
        "|---|---|",
    ]
    if len(manifest):
        short = manifest[["orig_width", "orig_height"]].min(axis=1)
        aspect = manifest[["orig_width", "orig_height"]].max(axis=1) / short.clip(lower=1)
    else:
        import pandas as pd

        short = aspect = pd.Series([], dtype=float)
    lines += _histogram(short, [0, 256, 512, 768, 1024, 2048])
    lines += ["", "Aspect ratio (long side / short side):", "", "| ratio | images |", "|---|---|"]
    lines += _histogram(aspect, [1.0, 1.25, 1.5, 2.0, 3.0])
    chars = manifest["caption"].str.len() if len(manifest) else None
    words = manifest["caption"].str.split().str.len() if len(manifest) else None
    lines += ["", "## Captions", ""]
    if chars is not None and words is not None:
        lines += [
            "| | min | median | mean | max |",
            "|---|---|---|---|---|",
            f"| characters | {chars.min()} | {chars.median():g} | {chars.mean():.1f} | {chars.max()} |",
            f"| words | {words.min()} | {words.median():g} | {words.mean():.1f} | {words.max()} |",
        ]
    lines += ["", "## Licences", ""]
    lines += [f"- `{k}`: {v}" for k, v in sorted(licences.items())] or [
        "No licence column in the source metadata: the licence of these images is unknown; "
        "check it before training a model you will distribute."
    ]
    flagged = int(manifest["unsafe"].sum()) if "unsafe" in manifest.columns else 0
    lines += [
        "",
        "## Safety",
        "",
        f"- Caption blocklist: {', '.join(safety.get('caption_blocklist', [])) or '(empty)'}",
        f"- Image classifier: {safety.get('classifier') or 'none configured'}"
        f" (threshold {safety.get('threshold')}, action `{safety.get('action')}`)",
        f"- Quarantined as unsafe: {reasons.get('unsafe_caption', 0)} by caption, "
        f"{reasons.get('unsafe_image', 0)} by image; kept but flagged: {flagged}",
    ]
    if safety.get("classifier") and "safety-tiny" in str(safety.get("classifier")):
        lines.append(
            "- The embedded demo's classifier is a tiny random-init model: it exercises the "
            "scoring path, its scores mean nothing. Configure a real NSFW detector in production."
        )
    lines += [
        "",
        "## Privacy",
        "",
        "Images are decoded and re-encoded from pixels, so EXIF (GPS included), XMP, IPTC and "
        "maker notes are dropped at ingest. The gate re-opened "
        f"{privacy.get('sampled', 0)} shard images and found metadata in {privacy.get('leaks', 0)}.",
        "Captions are not scanned for personal data: review sources that may name people.",
        "",
        "## Bias",
        "",
        "Captions mentioning each configured term group (a coarse signal, not a fairness audit):",
        "",
        "| group | captions | share | change vs previous version |",
        "|---|---|---|---|",
    ]
    for group, f in sorted(bias.items()):
        change = "first version" if f.get("share_change_pp") is None else f"{f['share_change_pp']:+.2f} pp"
        lines.append(f"| {group} | {f['captions']} | {100 * f['share']:.2f}% | {change} |")
    lines += [
        "",
        "## Intended use and limitations",
        "",
        "Fine-tuning text-to-image models inside this pipeline. The gate checks structure, "
        "duplicates, safety rates, licences, drift and privacy; it does not judge whether "
        "captions describe their images correctly, nor consent of people pictured.",
        "",
    ]
    return "\n".join(lines)
