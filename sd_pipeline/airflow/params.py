"""The trigger form of ``sd_train``: typed Params, and how each maps onto the config.

Bounds match the pydantic config, so a bad value is refused in the form, not mid-run.
"""

from __future__ import annotations

from typing import Any

from sd_pipeline.config import PipelineConfig

# Param name -> dotted config field it overrides.
PARAM_FIELDS: dict[str, str] = {
    "dataset_version": "dataset.version",
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
        "dataset_version": Param(
            "latest",
            type="string",
            title="Dataset version",
            description="'latest' accepted version, or an explicit 16-hex version id. "
            "A run started by a new dataset version uses that version.",
            pattern=r"^(latest|[0-9a-f]{16})$",
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
        "seed": Param(t.seed, type="integer", minimum=0, title="Seed"),
        # Not a config override: approving changes who decides, not what is trained (run id).
        "require_approval": Param(
            config.registry.require_approval,
            type="boolean",
            title="Require approval",
            description="Ask a person (an Airflow required action) before a challenger that beats "
            "the champion is promoted.",
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


def overrides_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted config overrides from a run's params (unknown params are ignored)."""
    return {field: params[name] for name, field in PARAM_FIELDS.items() if name in params}


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

