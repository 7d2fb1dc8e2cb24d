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
    """Where the raw captioned images come from; docs/ingest.md explains each kind."""

    kind: Literal["auto", "imagefolder", "sidecar", "urls"] = Field(
        "auto",
        description="imagefolder = images + metadata.jsonl or metadata.csv (file_name, text/caption); "
        "sidecar = kohya-style name.txt beside name.jpg; urls = a URL list (parquet, CSV, JSONL) "
        "to download; auto = urls when uri names a .parquet/.csv/.jsonl file, else imagefolder when "
        "the folder has a metadata file, else sidecar.",
    )
    uri: str = Field(
        "file://${SD_PIPELINE_HOME}/raw/shapes",
        description="file:///abs/path or s3://bucket/prefix: a folder (imagefolder, sidecar), or a URL "
        "list file or a folder of them (urls).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint of an s3:// source (MinIO); None = storage.endpoint_url, "
        "then AWS_ENDPOINT_URL, then AWS.",
    )
    caption_extension: str = Field(
        ".txt", pattern=r"^\.[A-Za-z0-9_.-]+$", description="Suffix of sidecar caption files."
    )
    url_column: str = Field("url", min_length=1, description="URL-list column holding the image URL.")
    caption_column: str = Field("caption", min_length=1, description="URL-list column holding the caption.")
    list_format: Literal["auto", "parquet", "csv", "jsonl"] = Field(
        "auto", description="Format of URL-list files; auto = from the file suffix."
    )
    max_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="Larger image files and downloads are quarantined (too_large) before they are read.",
    )
    read_workers: int = Field(
        16,
        ge=1,
        le=256,
        description="Threads fetching URLs, and s3:// objects (at most the S3 client's 10 connections), "
        "concurrently; local files are read in order. Up to 4x this many inputs wait in memory.",
    )
    timeout_seconds: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="Per download attempt: connect, headers and the whole body must arrive within it.",
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Further attempts after a transient failure (timeout, connection reset, "
        "HTTP 408/429/5xx).",
    )
    retry_backoff_seconds: float = Field(
        0.5, ge=0.0, le=60.0, description="Wait before retry n is this times 2**(n-1)."
    )
    max_redirects: int = Field(
        5, ge=0, le=20, description="Redirects followed per URL; every hop is checked again."
    )
    allow_private_networks: bool = Field(
        False,
        description="Let URLs reach loopback, private, link-local and other non-public addresses; "
        "cloud metadata services stay refused. Only for trusted lists on a trusted network.",
    )
    robots_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that refuse an image (robots_noai), as img2dataset's "
        "defaults; [] ignores the header.",
    )
    robots_user_agents: list[str] = Field(
        default_factory=lambda: ["sd-pipeline", "img2dataset"],
        description="X-Robots-Tag directives scoped to one of these agents ('img2dataset: noai') "
        "apply too; those scoped to other agents do not.",
    )
    user_agent: str = Field(
        "sd-pipeline/0.1 (image dataset ingestion; honours X-Robots-Tag noai)",
        min_length=1,
        description="User-Agent header of downloads.",
    )

    @model_validator(mode="after")
    def _scheme(self) -> SourceConfig:
        if not (self.uri.startswith(("file://", "s3://", "/"))):
            raise ValueError(
                f"dataset.source.uri {self.uri!r} must be file:///abs/path, s3://bucket/prefix or an "
                "absolute path (URL lists are files: put the URLs inside one)"
            )
        return self


class DatasetConfig(_Section):
    name: str = Field("shapes", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str = Field(
        "latest",
        pattern=r"^(latest|last:[1-9][0-9]{0,3}|window:[1-9][0-9]{0,3}d|[0-9a-f]{16}(,[0-9a-f]{16}){0,999})$",
        description="Dataset versions to train on: `latest` accepted, an explicit id, ids separated by "
        "commas, `last:N` (the N newest accepted daily versions) or `window:Nd` (the accepted daily "
        "versions of the last N days). A run pins what this resolves to (docs/ingest.md).",
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
        0,
        ge=0,
        le=256,
        description="Processes checking and decoding images (per ingest unit); 0 = one per CPU, started "
        "when the first images show the unit is worth it; 1 = in-process.",
    )
    schedule: str | None = Field(
        None,
        description="When sd_ingest runs by itself (cron or preset like @daily); None = only when "
        "triggered. With a schedule, dataset.source.uri may hold {{ ds }} (the run's date), and "
        "`airflow backfill create` builds the versions of past days.",
    )
    near_duplicate_distance: int = Field(
        2,
        ge=-1,
        le=32,
        description="Images whose colour difference hashes differ in at most this many of 192 "
        "bits are near duplicates: the first is kept, the others quarantined. -1 turns it off.",
    )
    resize_filter: Literal["area", "bicubic", "lanczos"] = Field(
        "area",
        description="How images are shrunk to dataset.resolution: area = box averaging (OpenCV's "
        "INTER_AREA, img2dataset's and kohya's choice; enlarging uses Lanczos), bicubic, or lanczos "
        "(sharpest, about 3x the resize cost). Part of the version id.",
    )
    crop: Literal["center", "none"] = Field(
        "center",
        description="center = centre-crop every image to a dataset.resolution square; none = keep "
        "the aspect ratio, shorter side resized to dataset.resolution (the longer side is at most "
        "max_aspect_ratio times that), for training's aspect-ratio buckets. Part of the version id.",
    )
    unit_size: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Inputs per work unit: sd_ingest runs one mapped task per unit (plan -> "
        "ingest_unit -> commit). The version id does not depend on it.",
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
        0.05,
        ge=0.0,
        le=1.0,
        description="Share of inputs flagged or quarantined as unsafe (classifier or blocklist).",
    )
    allowed_licenses: list[str] | None = Field(
        None, description="When set and the metadata has a license column, every value must be in it."
    )
    max_drift: float = Field(
        0.5,
        ge=0.0,
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


class BaseModelChoice(_Section):
    """A base model users may pick in the trigger form."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="Short id, shown in run configs.")
    title: str = Field(min_length=1, description="What the form shows, e.g. 'Stable Diffusion 1.5'.")
    base: str = Field(description="Local path, s3:// prefix or Hugging Face id, as model.base.")


class ModelConfig(_Section):
    base: str = Field(
        "${SD_PIPELINE_HOME}/models/tiny-sd",
        description="Base model in diffusers format: a local path, an s3:// prefix or a Hugging Face id.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type; None keeps the model's."
    )
    choices: list[BaseModelChoice] = Field(
        default_factory=list,
        description="Base models the sd_train form offers (by title); model.base is the default pick "
        "and is offered too when it is not among them.",
    )

    @model_validator(mode="after")
    def _unique_choices(self) -> ModelConfig:
        names = [c.name for c in self.choices]
        if len(set(names)) != len(names):
            raise ValueError(f"model.choices names must be unique; got {names}")
        return self


class TrainConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    steps: int = Field(60, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0.0, description="Defaults to the rank.")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 = none.")
    checkpoints_keep: int = Field(2, ge=1, le=1000, description="Newest committed checkpoints kept.")
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of samples trained on the empty caption (for CFG)."
    )
    train_text_encoder: bool = Field(
        False,
        description="Also train the (first) text encoder: LoRA on its attention for method=lora, all "
        "of it for method=full. Captions are then encoded every step, so the cache holds latents only.",
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule over train.steps (diffusers' get_scheduler).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of the schedule.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per step (effective batch: batch_size x this)."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping by global norm; 0 = off.")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit needs bitsandbytes (GPU) and fails at start without it."
    )
    adam_weight_decay: float = Field(1e-2, ge=0.0, le=1.0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 (no) on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    compile: bool = Field(
        False,
        description="torch.compile the UNet (inductor, in place). Compiling costs ~2.5 minutes at the "
        "first steps of an SD-1.5 UNet (less with inductor's on-disk cache), then each step is 1.4-1.6x "
        "faster on an H100 (docs/training.md): worth it from about 2,000-2,500 steps.",
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the trained weights and "
                      "publish it as the final weights.")
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR loss weighting gamma (5.0 is the paper's choice); None = off."
    )
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Offset noise strength; 0 = off.")
    buckets: bool = Field(
        True,
        description="Aspect-ratio buckets: each image goes to the bucket of nearest aspect ratio with "
        "about dataset.resolution^2 pixels; no batch mixes buckets.",
    )
    bucket_step: int = Field(
        64, ge=8, le=512, multiple_of=8, description="Bucket sides are multiples of this."
    )
    bucket_max_aspect: float = Field(2.0, ge=1.0, le=8.0, description="Most elongated bucket (long/short).")
    log_every: int = Field(10, ge=0, description="Steps between MLflow metric logs; 0 = off.")
    validate_every: int = Field(
        0, ge=0, description="Steps between validation images (evaluate prompts) logged to MLflow; 0 = off."
    )
    schedule: str | None = Field(
        None,
        description="Also retrain on this cron (or preset like @weekly) besides each new dataset "
        "version, whichever comes first; None = only on new versions and by hand. A run whose inputs "
        "match an already registered model is skipped.",
    )

    @model_validator(mode="after")
    def _cron(self) -> TrainConfig:
        check_cron(self.schedule, "train.schedule")
        return self


def check_cron(expression: str | None, field: str) -> None:
    """Refuse a malformed cron when the config loads, not when the scheduler parses the DAG."""
    if expression is None:
        return
    try:
        from croniter import croniter
    except ImportError:  # pods need no scheduler; the DAG's parse checks it there
        return
    if not croniter.is_valid(expression):
        raise ValueError(
            f"{field} {expression!r} is not a cron expression (5 fields like '0 3 * * 1') or a preset "
            "(@hourly, @daily, @weekly, @monthly, @yearly); None turns the schedule off"
        )


# Kubernetes syntax, checked here so a typo fails when the config loads, not when a GPU pod starts.
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # DNS-1123 label: namespaces, accounts, claims
_K8S_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # secrets, priority classes
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SECRET_LIKE = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY", re.I)
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
HEAVY_STAGES = ("cache", "train", "evaluate")


def quantity_value(quantity: str) -> float:
    """A Kubernetes quantity (``"16Gi"``, ``"500m"``, ``"8"``) as a plain number."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", quantity)
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity (like 8, 500m, 16Gi)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


class StepCompute(_Section):
    """Where one heavy step runs and, on Kubernetes, what its pod gets."""

    backend: Literal["local", "kubernetes"] | None = Field(
        None, description="Backend of this step; None = compute.backend."
    )
    gpus: int = Field(
        1,
        ge=0,
        le=16,
        description="GPUs of the pod (limits compute.kubernetes.gpu_resource); above 1 the stage "
        "command runs under `accelerate launch`, one process per GPU (the trainer does not yet "
        "split batches across them: see docs/deploy.md).",
    )
    gpu_types: list[str] = Field(
        default_factory=list,
        description="Acceptable GPU models, matched on the node label compute.kubernetes.gpu_type_label "
        "(required node affinity); empty = any GPU node.",
    )
    cpu: str = Field("8", pattern=_QUANTITY, description="CPU request (and limit unless cpu_limit is set).")
    cpu_limit: str | None = Field(None, pattern=_QUANTITY, description="CPU limit; None = cpu.")
    memory: str = Field(
        "32Gi", pattern=_QUANTITY, description="Memory request (and limit unless memory_limit is set)."
    )
    memory_limit: str | None = Field(None, pattern=_QUANTITY, description="Memory limit; None = memory.")
    shm: str = Field(
        "8Gi",
        pattern=_QUANTITY,
        description="Size of the in-memory emptyDir at /dev/shm (PyTorch data loader workers); "
        "it counts against the memory limit.",
    )

    @model_validator(mode="after")
    def _fits(self) -> StepCompute:
        limit = self.memory_limit or self.memory
        if quantity_value(self.shm) >= quantity_value(limit):
            raise ValueError(
                f"shm {self.shm} must be smaller than the memory limit {limit}: /dev/shm is memory "
                "of the pod; lower shm or raise memory"
            )
        pairs = ((self.cpu, self.cpu_limit, "cpu"), (self.memory, self.memory_limit, "memory"))
        for request, lim, what in pairs:
            if lim is not None and quantity_value(lim) < quantity_value(request):
                raise ValueError(f"{what}_limit {lim} is below the {what} request {request}")
        return self


class Toleration(_Section):
    """Lets the pod onto tainted nodes (GPU node pools are tainted so only GPU work lands there)."""

    key: str = Field(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_./]*$")
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class SecretEnv(_Section):
    """One environment variable of the pod read from a Kubernetes secret: a name and a key, never a value."""

    env: str = Field(pattern=_ENV_NAME)
    secret: str = Field(pattern=_K8S_SUBDOMAIN)
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool = Field(False, description="Start the pod even if the secret or key is missing.")


class KubernetesConfig(_Section):
    image: str = Field(
        "ghcr.io/sd-pipeline/train:0.1.0", description="Training image (docker/train.Dockerfile)."
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of docker-registry secrets in the namespace."
    )
    namespace: str = Field("sd-pipeline", pattern=_K8S_NAME)
    service_account: str = Field(
        "sd-pipeline-train",
        pattern=_K8S_NAME,
        description="Service account of the pods; bind it to S3 access with IRSA / workload identity.",
    )
    connection_id: str = Field(
        "kubernetes_default", description="Airflow connection to the cluster (in_cluster in the chart)."
    )
    pool: str = Field(
        "gpu",
        description="Airflow pool capping the GPUs in use: a pod takes one slot per GPU (at least one).",
    )
    retries: int = Field(
        2,
        ge=0,
        le=20,
        description="Task retries; a retry runs the same run id and resumes from its last checkpoint.",
    )
    priority_class: str | None = Field(
        "sd-pipeline-training", pattern=_K8S_SUBDOMAIN, description="PriorityClass of the pods; None = none."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels every pod requires, e.g. a GPU node pool."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product",
        description="Node label naming the GPU model (GKE: cloud.google.com/gke-accelerator; "
        "EKS with Karpenter: karpenter.k8s.aws/instance-gpu-name).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        validate_default=True,
    )
    secret_env: list[SecretEnv] = Field(
        default_factory=lambda: [
            {"env": name, "secret": secret, "key": name, "optional": True}
            for secret, names in (
                ("sd-pipeline-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
                ("sd-pipeline-mlflow", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")),
            )
            for name in names
        ],
        validate_default=True,
        description="Credentials as references to Kubernetes secrets (optional: IRSA / workload "
        "identity need no S3 keys).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain environment of the pods; names that look like credentials are refused "
        "(use secret_env).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra pod labels, e.g. team or cost-center for cost reports."
    )
    scratch_claim: str | None = Field(
        None,
        pattern=_K8S_NAME,
        description="PersistentVolumeClaim mounted at /scratch (model and data cache kept between "
        "runs); None = an emptyDir of scratch_size.",
    )
    scratch_size: str = Field("100Gi", pattern=_QUANTITY, description="Size limit of the emptyDir scratch.")
    schedule_timeout_seconds: int = Field(
        1800, ge=60, description="How long a pod may wait for a node: covers GPU node scale-up."
    )
    startup_timeout_seconds: int = Field(
        900, ge=60, description="How long a scheduled pod may take to start: covers pulling the image."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=60, description="Hard cap on a pod's run time (a cost guard); None = no cap."
    )
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = Field(
        "delete_succeeded_pod", description="Keep failed pods for `kubectl describe` and logs by default."
    )

    @model_validator(mode="after")
    def _plain_env_and_labels(self) -> KubernetesConfig:
        for name in self.env:
            if not re.fullmatch(_ENV_NAME, name):
                raise ValueError(f"env name {name!r} is not a valid environment variable name")
            if _SECRET_LIKE.search(name):
                raise ValueError(
                    f"env {name!r} looks like a credential; put it in a Kubernetes secret and reference "
                    "it with secret_env (env, secret, key) so its value never passes through Airflow"
                )
        for key, value in {**self.labels, **self.node_selector}.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(
                    f"label {key}={value!r} is not valid Kubernetes label syntax (value: up to 63 of "
                    "[A-Za-z0-9-_.], starting and ending alphanumeric)"
                )
        return self


class ComputeConfig(_Section):
    backend: Literal["local", "kubernetes"] = Field(
        "local",
        description="Default backend of the heavy steps: local = a subprocess on the Airflow worker, "
        "kubernetes = a pod per step; a step's own backend wins.",
    )
    cache: StepCompute = Field(
        StepCompute(gpus=1), description="The latent-cache step: the VAE encoder and text encoders, once."
    )
    train: StepCompute = StepCompute()
    evaluate: StepCompute = StepCompute()
    kubernetes: KubernetesConfig = KubernetesConfig()

    def step(self, stage: str) -> StepCompute:
        if stage not in HEAVY_STAGES:
            raise ValueError(f"stage {stage!r} has no compute settings; heavy stages are {HEAVY_STAGES}")
        step: StepCompute = getattr(self, stage)
        return step

    def backend_for(self, stage: str) -> Literal["local", "kubernetes"]:
        """The backend a heavy stage runs on: its own, else ``compute.backend``."""
        return self.step(stage).backend or self.backend


class EvaluateConfig(_Section):
    prompt_set: str = Field(
        "default-v1",
        description="Versioned prompt set: the name of one shipped in sd_pipeline/resources/prompts "
        "(default-v1), or a YAML file (path, file:// or s3:// URI) with name, version and prompts.",
    )
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="Inline prompts that replace the prompt set (recorded as set 'inline' with "
        "their digest); None uses prompt_set.",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(10, ge=1, le=1000, description="DDIM steps per sample.")
    guidance_scale: float = Field(3.0, ge=0.0, le=50.0)
    loss_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900], min_length=1)
    loss_seed: int = 1234
    compare_with_champion: bool = Field(
        True,
        description="Also evaluate the registry's current champion with the same prompts, seeds and "
        "holdout set, and draw both side by side; promotion compares the two.",
    )
    clip_model: str | None = Field(
        None,
        description="CLIP weights (transformers CLIPModel folder with its processor: a local path, "
        "file:// or s3:// prefix) for clip_score and the CLIP-feature fd_clip/kid_clip; None skips "
        "them and the results say why. Pre-stage them: nothing is downloaded from a hub.",
    )
    safety_checker: str | None = Field(
        None,
        description="A diffusers StableDiffusionSafetyChecker folder (with preprocessor_config.json) "
        "for unsafe_rate over the sampled images; None skips it and the results say why.",
    )
    fd_samples: int = Field(
        64,
        ge=2,
        le=100_000,
        description="At most this many held-out images (and as many samples from their captions) "
        "for fd_clip and kid_clip.",
    )


class PromotionRule(_Section):
    """One condition a challenger must meet against the champion to replace it."""

    metric: str = Field(pattern=r"^[A-Za-z0-9_.]+$", description="An evaluation metric, e.g. holdout_loss.")
    better: Literal["lower", "higher"]
    min_delta: float = Field(
        0.0,
        ge=0.0,
        description="The challenger must be better by more than zero and by at least this much.",
    )


class ModelCardConfig(_Section):
    """What the generated MODEL_CARD.md says beyond what the run records itself."""

    base_model: str | None = Field(
        None, description="Hub id of the base model for the card's front matter; None = model.base."
    )
    license: str = Field("other", description="License id for the front matter (e.g. creativeml-openrail-m).")
    tags: list[str] = Field(
        default_factory=lambda: ["stable-diffusion", "text-to-image", "diffusers", "sd-pipeline"]
    )
    intended_use: str = Field(
        "Generating images in the style and subject matter of the fine-tuning dataset, for "
        "research and internal evaluation.",
    )
    limitations: str = Field(
        "Trained on a single dataset version; quality outside its subjects is not evaluated. "
        "Automatic metrics do not replace human review of samples.",
    )


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
    alias: str = Field(
        "challenger",
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Alias a newly registered version gets.",
    )
    champion_alias: str = Field(
        "champion",
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Alias of the version in service; promotion and rollback move it.",
    )
    promote_when: list[PromotionRule] = Field(
        default_factory=lambda: [{"metric": "holdout_loss", "better": "lower", "min_delta": 0.0}],
        validate_default=True,
        min_length=1,
        description="A challenger becomes champion when it beats the champion on every rule "
        "(the first version becomes champion).",
    )
    require_approval: bool = Field(
        False,
        description="In sd_train, a person approves (Airflow human-in-the-loop) before a winning "
        "challenger becomes champion.",
    )
    approvers: list[str] = Field(
        default_factory=list,
        description="Airflow users (as the auth manager identifies them: the user name for the simple "
        "and most SSO auth managers) who may approve a promotion; the approval request is assigned "
        "to them and promote refuses anyone else's answer. Empty = anyone who may act on the DAG.",
    )
    model_card: ModelCardConfig = ModelCardConfig()

    @model_validator(mode="after")
    def _distinct_aliases(self) -> RegistryConfig:
        if self.alias == self.champion_alias:
            raise ValueError(
                f"registry.alias and registry.champion_alias are both {self.alias!r}; "
                "a new version must not become champion by registering"
            )
        return self


class AlertsConfig(_Section):
    """Where failure alerts go: an Airflow connection, so no address or token sits in the config."""

    connection_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,250}$",
        description="Airflow connection that receives alerts (UI Connections, or AIRFLOW_CONN_<ID>); "
        "None = alerts off.",
    )
    kind: Literal["auto", "webhook", "slack", "email"] = Field(
        "auto",
        description="auto = from the connection type: slackwebhook/slack -> slack (incoming-webhook "
        "payload), smtp/email -> email (through the SMTP connection), anything else -> webhook (JSON "
        "POST to the connection's host).",
    )
    email_to: list[str] = Field(
        default_factory=list, description="Recipients of email alerts (needed when the kind is email)."
    )
    on_task_failure: bool = Field(True, description="Alert when a task fails for good (no retry left).")
    on_gate_failure: bool = Field(True, description="Alert when a dataset version fails its quality gate.")
    timeout_seconds: float = Field(10.0, gt=0.0, le=120.0, description="Per alert delivery attempt.")

    @model_validator(mode="after")
    def _recipients(self) -> AlertsConfig:
        if self.kind == "email" and self.connection_id and not self.email_to:
            raise ValueError("alerts.kind is email but alerts.email_to is empty; list the recipients")
        bad = [a for a in self.email_to if not re.fullmatch(r"[^@\s]+@[^@\s]+", a)]
        if bad:
            raise ValueError(f"alerts.email_to holds {bad}, which are not e-mail addresses")
        return self


class Objective(_Section):
    """A target a run should reach: reported on every run, never a gate."""

    metric: str = Field(
        pattern=r"^[A-Za-z0-9_.]+$",
        description="A run metric: an evaluation metric (holdout_loss), train.<x>, or monitoring.<x>.",
    )
    target: float
    better: Literal["lower", "higher"] = Field(
        description="lower: met when the value is at most target; higher: at least target."
    )


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
    alerts: AlertsConfig = AlertsConfig()
    objectives: list[Objective] = Field(
        default_factory=list,
        description="Targets each run is reported against (run summary, MLflow objective.<metric>.* "
        "tags and metrics, model card); they do not block promotion.",
    )

    @model_validator(mode="after")
    def _distinct_objectives(self) -> PipelineConfig:
        metrics = [o.metric for o in self.objectives]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"objectives name {twice} more than once; keep one target per metric")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)

    def training_dump(self) -> dict[str, Any]:
        """The config without OPERATIONAL_FIELDS: what decides the trained model."""
        data = self.model_dump(mode="json")
        for dotted in OPERATIONAL_FIELDS:
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return data

    def fingerprint(self) -> str:
        """Content hash of what the resolved config trains: same inputs, same fingerprint.

        OPERATIONAL_FIELDS are left out: changing where alerts go, a target, the approvers or
        the retrain schedule must not make the same inputs a new run (and a retrain).
        """
        text = json.dumps(self.training_dump(), sort_keys=True, indent=2)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# How runs are operated, not what they train: outside the run id (PipelineConfig.fingerprint).
OPERATIONAL_FIELDS = ("alerts", "objectives", "registry.approvers", "train.schedule")


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


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
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
                f"{k} {getattr(m, k)}"
                for m in field.metadata
                for k in ("ge", "gt", "le", "lt", "multiple_of", "pattern", "min_length")
                if hasattr(m, k)
            )
            desc = (field.description or "") + (f" ({limits})" if limits else "")
            cells = (f"`{prefix}{name}`", f"`{kind}`", f"`{json.dumps(default)}`", desc)
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            lines.extend(
                [
                    f"## `{prefix.rstrip('.') or 'pipeline'}`",
                    "",
                    "| field | type | default | notes |",
                    "|---|---|---|---|",
                    *rows,
                    "",
                ]
            )

    walk(PipelineConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    # Through the imported module, so nested types print as sd_pipeline.config.X, not __main__.X.
    from sd_pipeline.config import reference_markdown as _reference

    print(_reference())
