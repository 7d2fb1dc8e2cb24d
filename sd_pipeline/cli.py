"""``sd-pipeline``: every stage as a command; the same commands run in GPU pods.

Each stage command prints its small JSON result (and writes it to ``--result-file``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from sd_pipeline.config import ConfigError, PipelineConfig, parse_config


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} must look like section.field=value")
        out[key] = yaml.safe_load(value)
    return out


def _config(args: argparse.Namespace) -> PipelineConfig:
    from sd_pipeline.stages import load_config_uri

    uri = args.config or os.environ.get("SD_PIPELINE_CONFIG")
    overrides = _overrides(args.set)
    if uri:
        return load_config_uri(uri, overrides)
    return parse_config({}, overrides, origin="built-in defaults")


def _emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    """JSON on stdout (one object) unless a person is reading a terminal without --json."""
    if os.environ.get("RANK", "0") != "0":  # one of several training processes: rank 0 reports
        return
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if getattr(args, "result_file", None):
        Path(args.result_file).write_text(text)
    if getattr(args, "json", False) or not sys.stdout.isatty():
        print(text)
        return
    for key, value in sorted(result.items()):
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
        print(f"{key:>20}  {shown}")


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """``sd-pipeline ingest [SOURCE] [--dataset NAME] [--store URI]``: flags override the config."""
    from sd_pipeline import stages

    for flag, field in (
        ("source", "dataset.source.uri"),
        ("dataset", "dataset.name"),
        ("store", "storage.root"),
    ):
        value = getattr(args, flag)
        if value:
            if flag in ("source", "store") and "://" not in value:
                value = f"file://{Path(value).resolve()}"
            args.set.append(f"{field}={value}")
    return stages.ingest(_config(args), ds=args.date)


def cmd_validate(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    return stages.validate(_config(args), args.version, args.date)


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    return stages.prepare_run(_config(args), args.dataset_version)


def _run_id(args: argparse.Namespace, config: PipelineConfig) -> str:
    from sd_pipeline.stages import run_id_for

    return args.run_id or run_id_for(config)


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    config = _config(args)
    return stages.cache(config, _run_id(args, config), rebuild=args.rebuild)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    config = _config(args)
    return stages.train(config, _run_id(args, config))


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    config = _config(args)
    return stages.evaluate(config, _run_id(args, config))


def cmd_register(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    config = _config(args)
    return stages.register(config, _run_id(args, config))


def cmd_reevaluate(args: argparse.Namespace) -> dict[str, Any]:
    """With --model-version and --prompt-set: the whole re-evaluation; with --config (a stored
    re-evaluation config) and --run-id: only its evaluation, as the sd_reevaluate DAG runs it."""
    from sd_pipeline.registry import reevaluate

    config = _config(args)
    if args.model_version:
        if not args.prompt_set:
            raise ConfigError("reevaluate --model-version needs --prompt-set (a shipped name or a YAML file)")
        return reevaluate.run_all(config, args.model_version, args.prompt_set, by=args.by)
    if not args.run_id:
        raise ConfigError("reevaluate needs --model-version and --prompt-set (or --config and --run-id)")
    return reevaluate.reevaluate(config, args.run_id)


def _whoami() -> str:
    """The local user name, for who decided; containers may have none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    config = _config(args)
    return stages.promote(config, _run_id(args, config), by=args.by, check_only=args.check)


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline import stages

    return stages.rollback(_config(args), by=args.by, reason=args.reason, to_version=args.to_version)


def cmd_setup(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline.demo import setup_embedded_home

    return setup_embedded_home(_config(args))


def cmd_tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    """``sd-pipeline tiny-model [--kind sd|sdxl] [--out DIR]``: a tiny random-init base model whose
    tokenizer is trained on the demo dataset's captions (default folder: the embedded home's)."""
    from sd_pipeline.home import EmbeddedHome
    from sd_pipeline.models.tiny import build_tiny_model
    from sd_pipeline.synthetic import all_captions

    home = EmbeddedHome.from_env()
    default = home.base_model_sdxl if args.kind == "sdxl" else home.base_model
    path = build_tiny_model(Path(args.out) if args.out else default, all_captions(), args.kind, args.seed)
    return {"kind": args.kind, "path": str(path), "use_with": f"--set model.base={path}"}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline.demo import run_demo

    return run_demo(_config(args))


def cmd_up(args: argparse.Namespace) -> dict[str, Any]:
    from sd_pipeline.demo import serve_uis

    serve_uis(_config(args))
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help: str, run_id: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument(
            "--config",
            help="pipeline YAML, or a run's config.json URI "
            "(default: $SD_PIPELINE_CONFIG, else built-in demo defaults)",
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.FIELD=VALUE",
            help="override one config field (repeatable)",
        )
        p.add_argument("--result-file", help="also write the JSON result here")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        if run_id:
            p.add_argument("--run-id", help="run id (default: derived from the resolved config)")
        p.set_defaults(func=func)
        return p

    ingest = add("ingest", cmd_ingest, "ingest a source into a dataset version")
    ingest.add_argument("source", nargs="?", help="folder, s3:// prefix or URL list (default: the config's)")
    ingest.add_argument("--dataset", help="dataset name (default: the config's)")
    ingest.add_argument("--store", help="store root: a folder, file:// or s3:// (default: the config's)")
    ingest.add_argument("--date", help="YYYY-MM-DD: fills {{ ds }} in a templated source URI")
    validate = add("validate", cmd_validate, "run the quality gate; on success the version becomes LATEST")
    validate.add_argument("--version", required=True, help="dataset version id to validate")
    validate.add_argument("--date", help="YYYY-MM-DD the version was ingested for (scheduled runs)")
    add("prepare", cmd_prepare, "pin the dataset version and store a run's resolved config").add_argument(
        "--dataset-version", help="'latest', ids, 'last:N' or 'window:Nd' (default: config)"
    )
    cache = add(
        "cache",
        cmd_cache,
        "compute the latent cache (VAE latents, text embeddings) of the run's dataset versions",
        run_id=True,
    )
    cache.add_argument("--rebuild", action="store_true", help="recompute it even if one is committed")
    add("train", cmd_train, "train (resumes the run if it has checkpoints)", run_id=True)
    add(
        "evaluate",
        cmd_evaluate,
        "evaluate a trained run next to the champion: losses, metrics, grids",
        run_id=True,
    )
    add("register", cmd_register, "log a run to MLflow and register its model", run_id=True)
    reeval = add(
        "reevaluate",
        cmd_reevaluate,
        "evaluate a registered version on another prompt set; metrics go to its MLflow run as reeval.<set>.*",
        run_id=True,
    )
    reeval.add_argument("--model-version", help="version number or alias (champion) of registry.model_name")
    reeval.add_argument("--prompt-set", help="shipped prompt set name or a YAML file (path, file://, s3://)")
    reeval.add_argument("--by", default="", help="who asks (recorded as a tag)")
    promote = add(
        "promote",
        cmd_promote,
        "make a registered run's version champion if it beats the "
        "champion on registry.promote_when (records who, when, why)",
        run_id=True,
    )
    promote.add_argument("--by", default=_whoami(), help="who decides (default: your user name)")
    promote.add_argument("--check", action="store_true", help="only print the verdict; change nothing")
    rollback = add(
        "rollback",
        cmd_rollback,
        "point the champion alias back at the previous champion (records who, when, why)",
    )
    rollback.add_argument("--reason", required=True, help="why; recorded on both versions")
    rollback.add_argument("--by", default=_whoami(), help="who (default: your user name)")
    rollback.add_argument("--to-version", help="roll back to this version instead of the previous champion")
    add("setup", cmd_setup, "prepare the embedded home: raw data, tiny base model, Airflow DB")
    tiny = add("tiny-model", cmd_tiny_model, "build a tiny random-init SD 1.x or SDXL base model (offline)")
    tiny.add_argument("--kind", choices=["sd", "sdxl"], default="sd", help="model family (default: sd)")
    tiny.add_argument("--out", help="folder (default: <SD_PIPELINE_HOME>/models/tiny-sd or tiny-sdxl)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    add("demo", cmd_demo, "run the whole pipeline through Airflow on the embedded home")
    add("up", cmd_up, "serve the Airflow UI and the MLflow UI for the embedded home")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from sd_pipeline.registry.promotion import RegistryRefused
    from sd_pipeline.stages import QualityGateFailed
    from sd_pipeline.storage import StoreError

    try:
        result = args.func(args)
    except ConfigError as err:
        print(f"sd-pipeline: {err}", file=sys.stderr)
        return 2
    except QualityGateFailed as err:
        print(f"sd-pipeline: {err}", file=sys.stderr)
        return 3
    except RegistryRefused as err:  # a promotion or rollback that cannot be done as asked
        print(f"sd-pipeline: {err}", file=sys.stderr)
        return 1
    except (StoreError, FileNotFoundError) as err:  # a missing input: say which, no traceback
        print(f"sd-pipeline: {err}", file=sys.stderr)
        return 1
    if result and args.command not in ("demo", "up"):
        _emit(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
