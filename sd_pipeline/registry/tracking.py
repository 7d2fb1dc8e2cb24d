"""Log a pipeline run to MLflow and register its model, idempotently per pipeline run id.

One MLflow run per pipeline run (found again by its ``sd_pipeline.run_id`` tag), and one
model version per pipeline run (found again by the same tag on the version), so running
the register task twice changes nothing but the alias, which it sets again.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sd_pipeline.config import RegistryConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("sd_pipeline.registry")

RUN_TAG = "sd_pipeline.run_id"
DATASET_TAG = "sd_pipeline.dataset"
DATASET_VERSION_TAG = "sd_pipeline.dataset_version"
MODEL_NAME_IN_RUN = "model"
MODEL_CARD_FILE = "MODEL_CARD.md"
VERSION_TAG_PREFIXES = ("airflow.", "sd_pipeline.git_")
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# MLflow's limits (mlflow.utils.validation): a param value holds at most 6000 characters,
# a batch at most 100 params or tags and 1000 metrics.
MAX_PARAM_CHARS = 6000
MAX_DIGEST_CHARS = 36
# What the pyfunc model needs where it is served; pinned to what logged it.
SERVING_PACKAGES = (
    "mlflow",
    "diffusers",
    "transformers",
    "torch",
    "safetensors",
    "peft",
    "accelerate",
    "pandas",
    "pillow",
)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": "5"}``; lists become JSON."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_CHARS:
            # The whole resolved config travels as an artifact; the param only indexes it.
            log.warning(
                "param %s has %d characters; MLflow keeps the first %d", name, len(text), MAX_PARAM_CHARS
            )
            text = text[: MAX_PARAM_CHARS - 3] + "..."
        flat[name] = text
    return flat


def _quoted(name: str, value: str) -> str:
    if "'" in value:
        raise ValueError(
            f"{name} {value!r} contains a single quote, which MLflow search "
            "filters cannot hold; use a run id without quotes"
        )
    return f"'{value}'"


def _artifact_root_uri(location: str) -> str:
    """A local path (or file:// URI) becomes an existing folder's file:// URI."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else location).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return location


def _experiment_id(client: MlflowClient, cfg: RegistryConfig) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = _artifact_root_uri(cfg.artifact_location) if cfg.artifact_location else None
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException:
            # Another task created it between our look-up and create.
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {cfg.experiment!r} is deleted; restore it "
            "(`mlflow experiments restore`) or set registry.experiment to another name"
        )
    return experiment.experiment_id


def _find_or_create_run(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = {_quoted('run_id', run_id)}",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    return client.create_run(experiment_id, run_name=run_id, tags={RUN_TAG: run_id}).info.run_id


def _log_params(client: MlflowClient, mlflow_run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(mlflow_run_id).data.params
    new = []
    for key, value in flatten_params(params).items():
        if key not in existing:
            new.append(Param(key, value))
        elif existing[key] != value:
            raise ValueError(
                f"param {key} is {existing[key]!r} in MLflow run {mlflow_run_id} but "
                f"{value!r} now; a pipeline run's config is fixed, so start a new run id"
            )
    for i in range(0, len(new), 100):
        client.log_batch(mlflow_run_id, params=new[i : i + 100])


def _log_metrics_and_tags(
    client: MlflowClient, mlflow_run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]
) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(mlflow_run_id, metrics=batch[i : i + 1000])
    run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(run_tags), 100):
        client.log_batch(mlflow_run_id, tags=run_tags[i : i + 100])


def _log_artifacts(client: MlflowClient, mlflow_run_id: str, artifacts: Mapping[str, Path]) -> None:
    """Each key is the artifact's path inside the run (``eval/grid.png``)."""
    if not artifacts:
        return
    with tempfile.TemporaryDirectory(prefix="sd-pipeline-artifacts-") as tmp:
        for key, path in artifacts.items():
            path = Path(path)
            if ".." in Path(key).parts:
                raise ValueError(f"artifact name {key!r} must stay inside the run: no '..'")
            dest = Path(tmp) / key.strip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest)
            elif path.is_file():
                shutil.copyfile(path, dest)
            else:
                raise FileNotFoundError(f"artifact {key!r}: {path} does not exist")
        client.log_artifacts(mlflow_run_id, tmp)


def _log_dataset(dataset: Mapping[str, Any]) -> None:
    """Dataset lineage: a metadata-only MLflow dataset named after the version it points to."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # file:// matches two registered source classes, both LocalArtifactDatasetSource.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        source = resolve_dataset_source(str(dataset["uri"]))
    meta = MetaDataset(  # type: ignore[abstract]  # profile is optional at runtime
        source=source,
        name=str(dataset["name"]),
        digest=str(dataset["version"]),
    )
    extra = {k: str(v) for k, v in dataset.items() if k not in ("name", "version", "uri")}
    mlflow.log_input(meta, context="training", tags=extra or None)


def _check_dataset(dataset: Mapping[str, Any]) -> None:
    missing = [k for k in ("name", "version", "uri") if not dataset.get(k)]
    if missing:
        raise ValueError(f"dataset needs {missing}; got keys {sorted(dataset)}")
    if len(str(dataset["version"])) > MAX_DIGEST_CHARS:
        raise ValueError(
            f"dataset version {dataset['version']!r} is longer than MLflow's "
            f"{MAX_DIGEST_CHARS}-character dataset digest"
        )


def _serving_requirements() -> list[str]:
    reqs = []
    for package in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{package}=={version.split('+')[0]}")  # drop local tags like +cpu
    return reqs


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("long", "seed", required=False),
                ColSpec("long", "num_inference_steps", required=False),
                ColSpec("double", "guidance_scale", required=False),
            ]
        ),
        outputs=Schema([ColSpec("binary", "image")]),
    )


def _model_uri_of_run(experiment_id: str, mlflow_run_id: str) -> str | None:
    """A model this run logged before (a retry after a failed registration), if any."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    models = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{mlflow_run_id}' AND name = '{MODEL_NAME_IN_RUN}'",
        output_format="list",
    )
    # A filter on status matches nothing on SQLite in MLflow 3.17, so check it here.
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def _log_model(model_dir: Path, base_model_dir: Path) -> str:
    import mlflow

    for label, folder in (("model_dir", model_dir), ("base_model_dir", base_model_dir)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{label} {folder} is not a folder")
    if not (Path(base_model_dir) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"base_model_dir {base_model_dir} has no model_index.json; pass a diffusers "
            "pipeline folder (the output of save_pretrained)"
        )
    with warnings.catch_warnings():
        # An input example would make MLflow load the pipeline and sample once at log
        # time (to validate serving input); the explicit signature documents the input.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_FILE),
            artifacts={"base_model": str(base_model_dir), "weights": str(model_dir)},
            signature=_signature(),
            pip_requirements=_serving_requirements(),
            registered_model_name=None,
        )
    return info.model_uri


def _version_of_run(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    versions = client.search_model_versions(
        f"name = {_quoted('model name', model_name)} AND tags.`{RUN_TAG}` = {_quoted('run_id', run_id)}"
    )
    return min(versions, key=lambda v: int(v.version)) if versions else None


def open_client(cfg: RegistryConfig) -> MlflowClient:
    """A client on the configured tracking server and registry (also set as mlflow's default)."""
    import mlflow
    from mlflow import MlflowClient

    if cfg.tracking_uri.startswith("sqlite:///"):
        # SQLite creates the database file but not the folder it lives in.
        Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def tracking_run(cfg: RegistryConfig, run_id: str) -> tuple[MlflowClient, str]:
    """The MLflow run of pipeline run ``run_id`` (created on first use): stages log into it."""
    client = open_client(cfg)
    return client, _find_or_create_run(client, _experiment_id(client, cfg), run_id)


def log_and_register(
    cfg: RegistryConfig,
    *,
    run_id: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: dict[str, Path],
    model_dir: Path,
    base_model_dir: Path,
    tags: dict[str, str],
    dataset: dict[str, Any],
) -> dict[str, str]:
    """Track pipeline run ``run_id`` in MLflow and register its model under ``cfg.model_name``.

    ``params`` is the resolved config (nested; logged as dotted keys), ``artifacts`` maps a
    path inside the run to a local file or folder, ``dataset`` holds the dataset's ``name``,
    ``version`` and store ``uri`` (other keys become tags of the dataset input).
    """
    import mlflow

    started = time.monotonic()
    if not re.fullmatch(r"[^\s']{1,250}", run_id):
        raise ValueError(f"run_id {run_id!r} must be 1-250 characters without spaces or quotes")
    _check_dataset(dataset)
    client = open_client(cfg)

    experiment_id = _experiment_id(client, cfg)
    mlflow_run_id = _find_or_create_run(client, experiment_id, run_id)
    run_tags = {
        **tags,
        RUN_TAG: run_id,
        DATASET_TAG: str(dataset["name"]),
        DATASET_VERSION_TAG: str(dataset["version"]),
    }
    _log_params(client, mlflow_run_id, params)
    _log_metrics_and_tags(client, mlflow_run_id, metrics, run_tags)
    _log_artifacts(client, mlflow_run_id, artifacts)

    version = _version_of_run(client, cfg.model_name, run_id)
    with mlflow.start_run(run_id=mlflow_run_id):
        _log_dataset(dataset)
        if version is None:
            model_uri = _model_uri_of_run(experiment_id, mlflow_run_id) or _log_model(
                Path(model_dir), Path(base_model_dir)
            )
            version = mlflow.register_model(
                model_uri,
                cfg.model_name,
                tags={
                    RUN_TAG: run_id,
                    "sd_pipeline.mlflow_run_id": mlflow_run_id,
                    DATASET_TAG: str(dataset["name"]),
                    DATASET_VERSION_TAG: str(dataset["version"]),
                    # where the code and the orchestration run are recorded on the version too
                    **{k: str(v) for k, v in tags.items() if k.startswith(VERSION_TAG_PREFIXES)},
                },
            )
        else:
            log.info(
                "model %s version %s already holds run %s; not registering again",
                cfg.model_name,
                version.version,
                run_id,
            )
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    result = {
        "mlflow_run_id": mlflow_run_id,
        "experiment_id": experiment_id,
        "model_name": cfg.model_name,
        "model_version": str(version.version),
        "alias": cfg.alias,
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
    }
    log.info(
        "registered %s version %s (@%s) from MLflow run %s in %.1fs",
        cfg.model_name,
        version.version,
        cfg.alias,
        mlflow_run_id,
        time.monotonic() - started,
    )
    return result


def log_model_card(cfg: RegistryConfig, mlflow_run_id: str, model_version: str, card: str) -> str:
    """Attach MODEL_CARD.md to the version's run, and its summary to the version; returns its URI."""
    client = open_client(cfg)
    client.log_text(mlflow_run_id, card, MODEL_CARD_FILE)
    uri = f"runs:/{mlflow_run_id}/{MODEL_CARD_FILE}"
    body = card.split("\n---\n", 1)[-1].strip()  # without the front matter
    summary = next((line for line in body.splitlines() if line and not line.startswith("#")), "")
    client.update_model_version(cfg.model_name, model_version, description=f"{summary}\n\nModel card: {uri}")
    client.set_model_version_tag(cfg.model_name, model_version, "sd_pipeline.model_card", uri)
    return uri


def log_run_extras(
    cfg: RegistryConfig,
    mlflow_run_id: str,
    model_version: str,
    *,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    documents: Mapping[str, Any],
) -> None:
    """Metrics, tags and JSON documents known only after registration (monitoring, objectives).

    Tags go on the run and on the model version, so the registry shows them too; metrics are
    logged again on a retry (a new point of the same value), tags and documents replaced.
    """
    client = open_client(cfg)
    _log_metrics_and_tags(client, mlflow_run_id, metrics, tags)
    for name, document in documents.items():
        client.log_dict(mlflow_run_id, json.loads(json.dumps(document, default=str)), name)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, model_version, key, value)

