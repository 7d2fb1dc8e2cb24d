"""One typed pipeline config: a YAML file validated by pydantic, with UI overrides.

Strings may use ``${VAR}`` environment references (``${SD_PIPELINE_HOME}`` always
resolves, to the embedded home). Unknown keys and bad values are refused with the
field's path and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sd_pipeline.home import EmbeddedHome


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names each bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    root: str = Field(
        "file://${SD_PIPELINE_HOME}/store",
        description="Root URI of the object store: file:///abs/path or s3://bucket/prefix.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO or a local S3 API server; None for AWS."
    )

    @model_validator(mode="after")
    def _scheme(self) -> StorageConfig:
        if not (self.root.startswith("file://") or self.root.startswith("s3://")):
            raise ValueError(f"storage.root {self.root!r} must start with file:// or s3://")
        return self


class SourceConfig(_Section):
    kind: Literal["imagefolder"] = "imagefolder"
    uri: str = Field(
        "file://${SD_PIPELINE_HOME}/raw/shapes",
        description="Folder with images and metadata.jsonl (file_name, text).",
    )


class DatasetConfig(_Section):
    name: str = Field("shapes", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str = Field(
        "latest",
        pattern=r"^(latest|[0-9a-f]{16})$",
        description="Dataset version to train on: latest accepted, or an explicit id.",
    )
    source: SourceConfig = SourceConfig()
    resolution: int = Field(64, ge=16, le=2048, multiple_of=8)
    shard_size: int = Field(256, ge=1, le=100_000, description="Samples per webdataset shard.")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="Share of samples held out for evaluation."
    )
    min_side: int = Field(32, ge=1, description="Smaller images are quarantined (too_small).")
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    max_pixels: int = Field(
        40_000_000, ge=1, description="Decompression-bomb guard, checked before decoding."
    )
    caption_max_chars: int = Field(1000, ge=1)
    workers: int = Field(
        0, ge=0, le=256, description="Processes decoding images; 0 = one per CPU, 1 = in-process."
    )
    near_duplicate_distance: int = Field(
        2, ge=-1, le=32,
        description="Images whose colour difference hashes differ in at most this many of 192 "
        "bits are near duplicates: the first is kept, the others quarantined. -1 turns it off.",
    )


DEFAULT_BIAS_TERMS: dict[str, list[str]] = {
    "gender_female": ["woman", "women", "girl", "girls", "female", "she", "her", "lady"],
    "gender_male": ["man", "men", "boy", "boys", "male", "he", "his", "gentleman"],
    "age_child": ["child", "children", "kid", "kids", "baby", "toddler"],
    "age_elderly": ["old", "elderly", "senior", "aged"],
    "skin_tone": ["dark-skinned", "light-skinned", "black person", "white person"],
}


class QualityConfig(_Section):
    min_rows: int = Field(50, ge=1)
    caption_min_chars: int = Field(3, ge=1)
    caption_max_chars: int = Field(1000, ge=1)
    min_side: int = Field(16, ge=1, description="Minimum width/height after processing.")
    max_aspect_ratio: float = Field(
        4.0, ge=1.0, description="Largest long/short side ratio of the source images."
    )
    max_quarantine_rate: float = Field(0.2, ge=0.0, le=1.0)
    max_near_duplicate_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of inputs quarantined as near duplicates."
    )
    max_unsafe_rate: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Share of inputs flagged or quarantined as unsafe (classifier or blocklist).",
    )
    allowed_licenses: list[str] | None = Field(
        None, description="When set and the metadata has a license column, every value must be in it."
    )
    max_drift: float = Field(
        0.5, ge=0.0,
        description="Largest relative change of mean caption length and median image side "
        "against the previous accepted version.",
    )
    privacy_sample: int = Field(
        64, ge=0, description="Shard images re-opened to check no EXIF/GPS/XMP survived; 0 = off."
    )
    bias_terms: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_BIAS_TERMS.items()},
        description="Term groups counted in captions for the bias report (whole words, any case).",
    )


class SafetyConfig(_Section):
    caption_blocklist: list[str] = Field(
        default_factory=lambda: ["nsfw", "nude", "naked", "gore", "porn"],
        description="Whole words or phrases (any case) that mark a caption unsafe.",
    )
    classifier: str | None = Field(
        None,
        description="Image-classification model in Hugging Face format (local path or s3:// "
        "prefix) that scores each image; None = captions only.",
    )
    unsafe_labels: list[str] = Field(
        default_factory=lambda: ["nsfw", "unsafe", "porn", "hentai", "sexy"],
        description="Classifier labels whose summed probability is the unsafe score.",
    )
    threshold: float = Field(0.8, ge=0.0, le=1.0, description="Unsafe score at or above which to act.")
    action: Literal["quarantine", "flag"] = Field(
        "quarantine", description="Quarantine unsafe inputs, or keep them flagged in the manifest."
    )


class ModelConfig(_Section):
    base: str = Field(
        "${SD_PIPELINE_HOME}/models/tiny-sd",
        description="Base model in diffusers format: a local path or an s3:// prefix.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type; None keeps the model's."
    )


class TrainConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    steps: int = Field(60, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0.0, description="Defaults to the rank.")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 = none.")
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class KubernetesConfig(_Section):
    image: str = "ghcr.io/sd-pipeline/train:0.1.0"
    namespace: str = "sd-pipeline"
    gpus: int = Field(1, ge=0, le=16)


class ComputeConfig(_Section):
    backend: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesConfig = KubernetesConfig()


class EvaluateConfig(_Section):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a red circle on a blue background",
            "a yellow square on a black background",
            "a green triangle on a white background",
            "a blue star on a red background",
        ],
        min_length=1,
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(10, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=0.0, le=50.0)
    loss_timesteps: list[int] = Field(
        default_factory=lambda: [100, 300, 500, 700, 900], min_length=1
    )
    loss_seed: int = 1234


class RegistryConfig(_Section):
    tracking_uri: str = Field(
        "sqlite:///${SD_PIPELINE_HOME}/mlflow/mlflow.db",
        description="MLflow tracking URI; the registry lives on the same server.",
    )
    artifact_location: str | None = Field(
        "${SD_PIPELINE_HOME}/mlflow/artifacts",
        description="Artifact root for a new experiment; None lets the server decide.",
    )
    experiment: str = "sd-pipeline"
    model_name: str = Field("sd-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    alias: str = Field("challenger", pattern=r"^[a-z][a-z0-9_-]{0,62}$")


class PipelineConfig(_Section):
    name: str = Field("demo", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    storage: StorageConfig = StorageConfig()
    dataset: DatasetConfig = DatasetConfig()
    quality: QualityConfig = QualityConfig()
    safety: SafetyConfig = SafetyConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    compute: ComputeConfig = ComputeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)

    def fingerprint(self) -> str:
        """Content hash of the resolved config: same config, same fingerprint."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise ConfigError(
                    f"environment variable ${{{m.group(1)}}} in {value!r} is not set; "
                    "export it or write the value into the config"
                )
            return env[m.group(1)]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    return value


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 5}`` -> ``{"train": {"steps": 5}}``; nested input passes through."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid pipeline config ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key; check the spelling (see docs/config.md)")
            continue
        got = e.get("input")
        allowed = e.get("ctx", {}).get("expected")
        msg = f"  {path}: {e['msg']}"
        if allowed:
            msg += f" (allowed: {allowed})"
        if not isinstance(got, dict):
            msg += f"; got {got!r}"
        lines.append(msg)
    return "\n".join(lines)


def parse_config(
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    origin: str = "<dict>",
    env: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Validate a config mapping (plus dotted or nested overrides) into a PipelineConfig."""
    environ = dict(os.environ if env is None else env)
    environ.setdefault("SD_PIPELINE_HOME", str(EmbeddedHome.from_env().root))
    merged = _deep_merge(dict(data), dotted_to_nested(overrides or {}))
    # Defaults carry ${SD_PIPELINE_HOME} too: validate, dump, expand, validate again.
    try:
        raw = PipelineConfig.model_validate(merged).model_dump(mode="json")
        return PipelineConfig.model_validate(_expand(raw, environ))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(
    path: str | Path, overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    """Load ``configs/<pipeline>.yaml`` (or a stored ``config.json``) and apply overrides."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return parse_config(data, overrides, origin=str(p))


def reference_markdown() -> str:
    """docs/config.md, generated from the models so it cannot drift from the code."""
    lines = [
        "# Pipeline config reference",
        "",
        "Generated by `python -m sd_pipeline.config > docs/config.md` (a test checks it is current).",
        "Strings may use `${VAR}`; `${SD_PIPELINE_HOME}` is the embedded home.",
        "Override any field with `--set section.field=value` or from the `sd_train` form.",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            kind = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            limits = ", ".join(
                f"{k} {getattr(m, k)}" for m in field.metadata for k in
                ("ge", "gt", "le", "lt", "multiple_of", "pattern", "min_length") if hasattr(m, k)
            )
            desc = (field.description or "") + (f" ({limits})" if limits else "")
            cells = (f"`{prefix}{name}`", f"`{kind}`", f"`{json.dumps(default)}`", desc)
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'pipeline'}`", "",
                          "| field | type | default | notes |", "|---|---|---|---|", *rows, ""])

    walk(PipelineConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
