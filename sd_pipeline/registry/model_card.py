"""MODEL_CARD.md for a registered version: Hugging Face style front matter, then what a reader
needs to trust or reject it (training, evaluation, intended use, limitations, lineage).

Rendered from the records the pipeline already keeps (resolved config, training metadata,
evaluation report, dataset records), so it can be rebuilt for any version at any time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from sd_pipeline.config import PipelineConfig
from sd_pipeline.registry.objectives import card_section

HEADLINE_METRICS = ("holdout_loss", "base_holdout_loss", "holdout_loss_improvement", "clip_score",
                    "fd_clip", "kid_clip", "unsafe_rate")
DATACARD_SECTIONS = re.compile(r"limitation|bias|risk|responsib|caveat", re.I)


def render_model_card(
    *,
    model_name: str,
    model_version: str,
    config: PipelineConfig,
    train: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    dataset: Mapping[str, Any],
    lineage: Mapping[str, str],
    objectives: list[dict[str, Any]] | None = None,
    monitoring: Mapping[str, Any] | None = None,
) -> str:
    """The card's Markdown.

    ``train`` is the run's ``final/metadata.json``, ``evaluation`` its ``eval/metrics.json``;
    ``dataset`` holds ``name``, ``version``, ``uri`` and optionally ``ingest`` (ingest.json),
    ``verdict`` (the quality verdict) and ``datacard`` (DATACARD.md text); ``lineage`` maps
    tag names (git commit, Airflow ids, MLflow run id) to values. ``objectives`` are the
    run's standing against the config's objectives (``registry.objectives.assess``),
    ``monitoring`` its cost summary (``registry.monitoring.run_summary``).
    """
    card = config.registry.model_card
    tc = config.train
    tags = [*card.tags, "lora" if tc.method == "lora" else "full-fine-tune"]
    front = {
        "base_model": card.base_model or config.model.base,
        "license": card.license,
        "datasets": [str(dataset["name"])],
        "tags": list(dict.fromkeys(tags)),
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {model_name} version {model_version}", "",
             f"A {'LoRA adapter' if tc.method == 'lora' else 'full UNet fine-tune'} of "
             f"`{front['base_model']}` on dataset `{dataset['name']}` version `{dataset['version']}`, "
             f"trained and registered by sd-pipeline (pipeline `{config.name}`, "
             f"run `{train.get('run_id')}`).",
             "", "## Use it", "", "```python", "import mlflow, pandas as pd",
             f'model = mlflow.pyfunc.load_model("models:/{model_name}/{model_version}")',
             'images = model.predict(pd.DataFrame({"prompt": ["..."], "seed": [0]}))["image"]  # PNG bytes',
             "```", ""]
    lines += _training(config, train, dataset)
    lines += _evaluation(evaluation)
    lines += card_section(objectives or [])
    lines += _cost(monitoring)
    lines += ["## Intended use", "", card.intended_use, ""]
    lines += _limitations(card.limitations, dataset)
    lines += ["## Lineage", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(lineage.items()) if v]
    return "\n".join(lines).rstrip() + "\n"


def _training(config: PipelineConfig, train: Mapping[str, Any], dataset: Mapping[str, Any]) -> list[str]:
    tc = config.train
    base = train.get("base_model") or {}
    rows = {
        "method": tc.method,
        "steps": tc.steps,
        "batch size": tc.batch_size,
        "learning rate": tc.learning_rate,
        "seed": tc.seed,
        "resolution": config.dataset.resolution,
        "prediction type": train.get("prediction_type"),
        "training samples": (train.get("dataset") or {}).get("train_samples"),
        "final training loss": _fmt(train.get("final_loss")),
        "training time (s)": train.get("seconds"),
        "device": train.get("device"),
        "base model sha256": base.get("sha256"),
    }
    if tc.method == "lora":
        rows["LoRA rank / alpha"] = f"{tc.lora_rank} / {tc.lora_alpha or tc.lora_rank}"
    lines = ["## Training details", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if v is not None]
    ingest = dataset.get("ingest") or {}
    verdict = dataset.get("verdict") or {}
    lines += ["", f"Dataset `{dataset['name']}` version `{dataset['version']}` ({dataset['uri']})"
              + (f": {ingest.get('accepted')} samples accepted, {ingest.get('quarantined')} quarantined"
                 if ingest else "") + "."]
    if verdict:
        lines += [f"Quality gate: {'passed' if verdict.get('passed') else 'failed'}"
                  + (f" (failed: {', '.join(verdict['failures'])})" if verdict.get("failures") else "") + "."]
    return [*lines, ""]


def _evaluation(report: Mapping[str, Any]) -> list[str]:
    metrics = report.get("metrics") or {}
    champion = report.get("champion") or {}
    theirs = champion.get("metrics") or {}
    prompt_set = report.get("prompt_set") or {}
    grid = report.get("grid") or {}
    lines = ["## Evaluation results", ""]
    if prompt_set:
        count, digest = len(prompt_set.get("prompts", [])), str(prompt_set.get("sha256"))[:12]
        lines += [f"Prompt set `{prompt_set.get('name')}` version `{prompt_set.get('version')}` "
                  f"({count} prompts, sha256 `{digest}`), seeds {grid.get('seeds')}, "
                  f"{grid.get('scheduler')} with {grid.get('num_inference_steps')} steps, "
                  f"guidance {grid.get('guidance_scale')}.", ""]
    header = "| metric | this version |" + (f" champion v{champion.get('model_version')} |" if theirs else "")
    lines += [header, "|---|---|" + ("---|" if theirs else "")]
    for name in HEADLINE_METRICS:
        if name in metrics:
            other = f" {_fmt(theirs.get(name))} |" if theirs else ""
            lines.append(f"| {name} | {_fmt(metrics[name])} |{other}")
    if champion.get("skipped"):
        lines += ["", f"Champion comparison: not made ({champion['skipped']})."]
    elif not champion:
        lines += ["", "Champion comparison: there was no champion yet."]
    sources = report.get("metric_sources") or {}
    used = sorted({f"{s['evaluator']} `{s['weights']}` (sha256 `{s['sha256'][:12]}`)"
                   for s in sources.values() if isinstance(s, dict) and s.get("evaluator")})
    if used:
        lines += ["", "Evaluator weights: " + "; ".join(used) + "."]
    skipped = report.get("skipped") or {}
    if skipped:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    return [*lines, ""]


def _cost(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary:
        return []
    durations = ", ".join(f"{k} {v:.1f} s" for k, v in (summary.get("durations_s") or {}).items())
    return ["## Cost", "", f"Stage durations: {durations or 'n/a'}. GPU-hours: {summary.get('gpu_hours')} "
            f"({summary.get('gpus')} GPU(s), device {summary.get('device')}). Throughput: "
            f"{_fmt(summary.get('samples_per_s'))} samples/s.", ""]


def _limitations(configured: str, dataset: Mapping[str, Any]) -> list[str]:
    lines = ["## Limitations and bias", "", configured, ""]
    datacard = dataset.get("datacard")
    if not datacard:
        return [*lines, f"No data card was published with dataset version `{dataset['version']}`; "
                "its limitations and biases are undocumented.", ""]
    sections = datacard_sections(datacard)
    if not sections:
        return [*lines, "The dataset's data card (logged as `dataset/DATACARD.md`) names no "
                "limitations or biases.", ""]
    lines.append("From the dataset's data card:")
    for title, body in sections:
        lines += ["", f"### {title}", "", body]
    return [*lines, ""]


def datacard_sections(markdown: str) -> list[tuple[str, str]]:
    """The data card's sections about limitations, bias, risks or responsible use."""
    out: list[tuple[str, str]] = []
    parts = re.split(r"^(#{1,6})\s+(.+?)\s*$", markdown, flags=re.M)
    # parts: [preamble, hashes, title, body, hashes, title, body, ...]
    for i in range(1, len(parts) - 2, 3):
        title, body = parts[i + 1], parts[i + 2].strip()
        if DATACARD_SECTIONS.search(title) and body:
            out.append((title, body))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)
