"""Compute backends: where a heavy stage (train, evaluate) runs.

``local`` runs the very command a GPU pod runs (``sd-pipeline <stage> --config URI
--run-id ID``) as a subprocess, streaming its log lines and reading back its small JSON
result. The Kubernetes backend runs the same command in a pod (``pod_command``), under
``accelerate launch`` when the pod has several GPUs, and reads the result through XCom.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("sd_pipeline.compute")


class StageFailed(RuntimeError):
    """The stage's command exited non-zero; the message carries its last output lines."""


def stage_command(stage: str, config_uri: str, run_id: str) -> list[str]:
    """The command line of a stage, identical for the local backend and a pod."""
    return ["sd-pipeline", stage, "--config", config_uri, "--run-id", run_id]


# The KubernetesPodOperator's sidecar pushes this file to XCom; it holds the small JSON result.
XCOM_RESULT_FILE = "/airflow/xcom/return.json"


def pod_command(stage: str, config_uri: str, run_id: str, gpus: int) -> list[str]:
    """The full command of a stage's pod: the stage command, its result written for XCom.

    With more than one GPU, ``accelerate launch`` starts one process per GPU running that
    same command (``--no_python`` runs it as is rather than as a Python script).
    """
    command = stage_command(stage, config_uri, run_id)
    if gpus > 1:
        command = [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            str(gpus),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--no_python",
            *command,
        ]
    return [*command, "--result-file", XCOM_RESULT_FILE]


def run_local(stage: str, config_uri: str, run_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a stage's command in a subprocess of this Python; return its JSON result."""
    with tempfile.TemporaryDirectory(prefix=f"sd-{stage}-") as tmp:
        result_file = Path(tmp) / "result.json"
        args = stage_command(stage, config_uri, run_id)
        # The same command, through this interpreter so the venv needs no PATH set-up.
        cmd = [sys.executable, "-m", "sd_pipeline.cli", *args[1:], "--result-file", str(result_file)]
        log.info("local backend: %s", " ".join(args))
        tail: deque[str] = deque(maxlen=40)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("[%s] %s", stage, line)
        code = proc.wait()
        if code != 0:
            raise StageFailed(f"`{' '.join(args)}` exited with {code}; last lines:\n" + "\n".join(tail))
        return json.loads(result_file.read_text())
