"""The trigger form of ``sd_train``: typed Params, and how each maps onto the config.

Bounds match the pydantic config, so a bad value is refused in the form, not mid-run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd_pipeline.config import DatasetConfig, PipelineConfig, RegistryConfig

# Param name -> dotted config field it overrides (base_model goes through model.choices).
PARAM_FIELDS: dict[str, str] = {
    "dataset_version": "dataset.version",
    "resolution": "dataset.resolution",
    "gpus": "compute.train.gpus",
    "method": "train.method",
    "steps": "train.steps",
    "learning_rate": "train.learning_rate",
    "lora_rank": "train.lora_rank",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
}


def train_params(config: PipelineConfig) -> dict[str, Any]:
    from airflow.sdk import Param

    t = config.train
    return {
        "base_model": Param(
            _default_choice(config),
            type="string",
            enum=[name for name, _, _ in base_model_choices(config)],
            values_display={name: title for name, title, _ in base_model_choices(config)},
            title="Base model",
            description="The model to fine-tune (model.choices of the pipeline config).",
        ),
        "dataset_version": Param(
            config.dataset.version,
            type="string",
            title="Dataset versions",
            description="'latest' accepted version; one or more 16-hex version ids separated by commas; "
            "'last:N' (the N newest daily versions) or 'window:Nd' (the daily versions of the last N "
            "days). A run started by a new dataset version uses that version.",
            pattern=DatasetConfig.model_fields["version"].metadata[0].pattern,
        ),
        "resolution": Param(
            config.dataset.resolution,
            type="integer",
            minimum=16,
            maximum=2048,
            multipleOf=8,
            title="Resolution",
            description="Training resolution in pixels (bucket area for non-square images).",
        ),
        "method": Param(
            t.method,
            type="string",
            enum=["lora", "full"],
            title="Method",
            values_display={"lora": "LoRA adapter", "full": "Full UNet fine-tune"},
        ),
        "steps": Param(t.steps, type="integer", minimum=1, maximum=1_000_000, title="Training steps"),
        "learning_rate": Param(
            t.learning_rate, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate"
        ),
        "lora_rank": Param(t.lora_rank, type="integer", minimum=1, maximum=1024, title="LoRA rank"),
        "batch_size": Param(t.batch_size, type="integer", minimum=1, maximum=4096, title="Batch size"),
        **_gpu_params(config),
        "seed": Param(t.seed, type="integer", minimum=0, title="Seed"),
        # Not a config override: approving changes who decides, not what is trained (run id).
        # The form can only add an approval: registry.require_approval cannot be switched off here.
        "require_approval": Param(
            config.registry.require_approval,
            type="boolean",
            title="Require approval",
            description="Ask a person (an Airflow required action) before a challenger that beats "
            "the champion is promoted. Always on when the pipeline config sets "
            "registry.require_approval; a run that asks for false is then refused.",
        ),
    }


def rollback_params() -> dict[str, Any]:
    """The trigger form of ``sd_rollback``: why (required), who, and optionally which version."""
    from airflow.sdk import Param

    return {
        "reason": Param(
            type="string",
            minLength=3,
            title="Reason",
            description="Why the champion is rolled back; recorded on both model versions.",
        ),
        "requested_by": Param(
            None,
            type=["null", "string"],
            title="Requested by",
            description="Who asks for it; empty = the user who triggered this run.",
        ),
        "to_version": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]+$",
            title="Roll back to version",
            description="Empty = the champion before the current one.",
        ),
    }


def _gpu_params(config: PipelineConfig) -> dict[str, Any]:
    """The GPU count, for pods only: the local backend trains on what the worker has.

    The compute backend itself is the deployment's choice (compute.backend in the config), not
    a form field: it decides the DAG's shape (a pod or a subprocess, the GPU pool) at parse time.
    """
    from airflow.sdk import Param

    if config.compute.backend_for("train") != "kubernetes":
        return {}
    return {
        "gpus": Param(
            config.compute.train.gpus,
            type="integer",
            minimum=0,
            maximum=16,
            title="GPUs",
            description="GPUs of the training pod; above 1 it trains with accelerate (DDP).",
        )
    }


def base_model_choices(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """(name, title, base) the form offers: model.choices, plus model.base when not among them."""
    choices = [(c.name, c.title, c.base) for c in config.model.choices]
    if config.model.base not in {base for _, _, base in choices}:
        choices.insert(0, ("configured", f"Configured base ({config.model.base})", config.model.base))
    return choices


def _default_choice(config: PipelineConfig) -> str:
    return next(name for name, _, base in base_model_choices(config) if base == config.model.base)


def overrides_from_params(params: dict[str, Any], config: PipelineConfig | None = None) -> dict[str, Any]:
    """Dotted config overrides from a run's params (params that are not config fields are skipped)."""
    overrides = {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name) is not None}
    if config is not None and params.get("base_model"):
        bases = {name: base for name, _, base in base_model_choices(config)}
        if params["base_model"] not in bases:
            raise ValueError(f"base_model {params['base_model']!r} is not one of {sorted(bases)}")
        overrides["model.base"] = bases[params["base_model"]]
    return overrides


def approval_wanted(params: Mapping[str, Any], registry: RegistryConfig) -> bool:
    """Whether a run asks a person before promoting: always when ``registry.require_approval``
    is set, else when the run's ``require_approval`` param asks for it.

    A trigger that asks for false where the config requires approval is refused rather than
    quietly overruled, so whoever sent it learns that approval stays on.
    """
    asked = params.get("require_approval")
    if registry.require_approval and asked is False:
        raise ValueError(
            "the trigger asks for require_approval false, but registry.require_approval is true in the "
            "pipeline config: approval is enforced by the config and a run cannot switch it off; trigger "
            "without require_approval (or with true), or change registry.require_approval in the config"
        )
    return bool(registry.require_approval or asked)


def unknown_conf_keys(conf: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """Keys of a trigger's conf that are no param of the DAG: a typo would otherwise train defaults."""
    return sorted(set(conf) - set(params))


def reevaluate_params(config: PipelineConfig) -> dict[str, Any]:
    """The trigger form of ``sd_reevaluate``: which registered version, which prompt set."""
    from airflow.sdk import Param

    return {
        "model_version": Param(
            config.registry.champion_alias,
            type="string",
            pattern=r"^([0-9]{1,9}|[a-z][a-z0-9_-]{0,62})$",
            minLength=1,
            maxLength=63,
            title="Model version",
            description=f"A version number of {config.registry.model_name}, or an alias "
            f"({config.registry.champion_alias}, {config.registry.alias}).",
        ),
        "prompt_set": Param(
            type="string",
            minLength=1,
            maxLength=1000,
            pattern=r"^\S+$",
            title="Prompt set",
            description="A shipped prompt set (e.g. default-v1, see sd_pipeline/resources/prompts) or a "
            "YAML file with name, version and prompts (path, file:// or s3:// URI). Metrics are logged to "
            "the version's MLflow run as reeval.<set name>.<metric>.",
        ),
    }
