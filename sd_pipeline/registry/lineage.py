"""Where a registered model comes from beyond its data: the code commit and the orchestrator run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

GIT_COMMIT_ENV = "SD_PIPELINE_GIT_COMMIT"  # set in images built without a .git folder
AIRFLOW_KEYS = ("airflow.dag_id", "airflow.run_id", "airflow.triggered_by_asset")


def git_commit(repo: Path | None = None) -> dict[str, str]:
    """``{"sd_pipeline.git_commit": sha, "sd_pipeline.git_dirty": "true"|"false"}`` when known.

    ``$SD_PIPELINE_GIT_COMMIT`` wins (a container image records its commit there); else the
    checkout this package runs from is asked. Returns ``{}`` when neither knows.
    """
    from_env = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if from_env:
        return {"sd_pipeline.git_commit": from_env, "mlflow.source.git.commit": from_env}
    if repo is None:
        from sd_pipeline.home import repo_root

        repo = repo_root()
    if not (repo / ".git").exists():
        return {}
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    if not sha:
        return {}
    return {"sd_pipeline.git_commit": sha, "sd_pipeline.git_dirty": str(bool(status.strip())).lower(),
            "mlflow.source.git.commit": sha}


def airflow_tags(trigger: Mapping[str, str]) -> dict[str, str]:
    """The Airflow dag and run that prepared a run (``runs/<id>/trigger.json``), as tags."""
    return {k: str(trigger[k]) for k in AIRFLOW_KEYS if trigger.get(k)}
