"""A real Airflow on a fresh embedded home, as `airflow standalone` runs it, for tests.

Each service (api-server, scheduler, dag-processor, triggerer) runs as its own process
group, so stopping the stack stops its task workers too, and every port (API, log servers)
is a free one, so stacks can run side by side. Every service logs to a file whose tail a
failing test shows. `AirflowStack.api` talks to the public REST API (/api/v2) with a token
from the simple auth manager, as a user's script would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from conftest import free_port

from sd_pipeline.home import EmbeddedHome, airflow_env

STANDALONE = ("api-server", "scheduler", "dag-processor", "triggerer")
# What the health endpoint calls each service that reports a heartbeat.
HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
AIRFLOW = Path(sys.executable).with_name("airflow")
TERMINAL = ("success", "failed")


class StackError(AssertionError):
    """Something in the stack went wrong; the message carries the logs that say why."""


@dataclass
class AirflowStack:
    """A running Airflow: its environment, URL, user and the logs of each service."""

    env: dict[str, str]
    port: int
    logs: Path
    username: str
    password: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def airflow_home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    # -- logs ---------------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def service_logs(self, lines: int = 60) -> str:
        return "\n".join(
            f"===== {name} ({self.logs / name}.log), last {lines} lines =====\n{self.log_tail(name, lines)}"
            for name in self.procs
        )

    def task_logs(self, dag_id: str, run_id: str, lines: int = 80) -> str:
        """The task logs of one run, as the UI's log view shows them (tails)."""
        folder = self.airflow_home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        parts = []
        for path in sorted(folder.glob("task_id=*/**/*.log")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"----- {path.relative_to(folder)} -----\n{tail}")
        return "\n".join(parts) or f"(no task logs under {folder})"

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise StackError(f"airflow {name} exited with {proc.returncode}\n{self.service_logs()}")

    # -- REST API -------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """One HTTP call; returns (status, parsed JSON or text). Never raises on 4xx/5xx."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def token(self) -> str:
        """A JWT from the auth manager in use (simple auth manager: user name + password)."""
        if self._token is None:
            status, body = self.request(
                "POST", "/auth/token", {"username": self.username, "password": self.password}
            )
            if status != 201:
                raise StackError(f"POST /auth/token answered {status}: {body}")
            self._token = str(body["access_token"])
        return self._token

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A call to the public REST API, authenticated."""
        return self.request(method, f"/api/v2{path}", body, token=self.token())

    def api_ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.api(method, path, body)
        if status >= 300:
            raise StackError(f"{method} /api/v2{path} answered {status}: {answer}")
        return answer

    # -- waiting ----------------------------------------------------------------------------

    def wait_healthy(self, timeout: float = 180) -> None:
        """Until the API answers and every started service reports a healthy heartbeat."""
        wanted = [HEALTH_KEYS[name] for name in self.procs if name in HEALTH_KEYS]
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, last = self.request("GET", "/api/v2/monitor/health")
            except OSError as err:  # not listening yet
                status, last = 0, repr(err)
            if status == 200 and all((last.get(key) or {}).get("status") == "healthy" for key in wanted):
                return
            time.sleep(1)
        raise StackError(f"Airflow not healthy after {timeout:.0f}s: {last}\n{self.service_logs()}")

    def wait_for_dags(self, dag_ids: Sequence[str], timeout: float = 180) -> None:
        """Until the DAG processor has parsed and serialized these DAGs."""
        deadline = time.monotonic() + timeout
        missing = list(dag_ids)
        while time.monotonic() < deadline:
            self.check_alive()
            missing = [d for d in dag_ids if self.api("GET", f"/dags/{d}/details")[0] != 200]
            if not missing:
                return
            time.sleep(2)
        errors = self.api("GET", "/importErrors")[1]
        raise StackError(f"DAGs {missing} not parsed after {timeout:.0f}s; import errors: {errors}")

    def run_path(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"

    def task_durations(self, dag_id: str, run_id: str) -> dict[str, float | None]:
        """Seconds each task of a run took, as the API reports them (for timing figures)."""
        tis = self.api_ok("GET", f"{self.run_path(dag_id, run_id)}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["duration"] and round(ti["duration"], 1) for ti in tis}

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 600, until: Sequence[str] = ("success",)
    ) -> dict[str, Any]:
        """Until the run reaches a state in ``until`` (default: it succeeded).

        A run that ends otherwise, or not in time, raises with its task logs and the services' logs.
        """
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.check_alive()
            status, answer = self.api("GET", self.run_path(dag_id, run_id))
            if status == 404:  # not created yet (a backfill creates its runs as it goes)
                time.sleep(3)
                continue
            if status != 200:
                raise StackError(f"GET run {dag_id}/{run_id} answered {status}: {answer}")
            run = answer
            if run["state"] in until:
                return run
            if run["state"] in TERMINAL:
                raise StackError(
                    f"{dag_id} run {run_id} ended {run['state']}\n{self.task_logs(dag_id, run_id)}\n"
                    f"{self.service_logs(30)}"
                )
            time.sleep(2)
        raise StackError(
            f"{dag_id} run {run_id} still {run.get('state')} after {timeout:.0f}s\n"
            f"{self.task_logs(dag_id, run_id)}\n{self.service_logs()}"
        )

    def wait_for_new_run(
        self, dag_id: str, run_type: str, known: set[str], timeout: float = 120
    ) -> dict[str, Any]:
        """Until the scheduler creates a run of this type that is not in ``known``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            runs = self.api_ok("GET", f"/dags/{dag_id}/dagRuns?run_type={run_type}&limit=100")["dag_runs"]
            new = [r for r in runs if r["dag_run_id"] not in known]
            if new:
                return dict(new[0])
            time.sleep(2)
        raise StackError(f"no new {run_type} run of {dag_id} after {timeout:.0f}s\n{self.service_logs()}")


def dags_env(home: Path, config: Path) -> dict[str, str]:
    """The product's Airflow environment for the embedded ``home`` with pipeline ``config``, as
    ``airflow dags test`` needs it."""
    return {**os.environ, **airflow_env(EmbeddedHome(home)), "SD_PIPELINE_CONFIG": str(config)}


def stack_env(home: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The product's Airflow environment for the embedded home, plus this stack's port and users."""
    env = {
        **os.environ,
        **airflow_env(EmbeddedHome(home)),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # The scheduler and the triggerer serve task logs on 8793 and 8794 by default: stacks
        # running side by side (or beside `make up`) must not share them.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__CORE__PARALLELISM": "2",  # two cores: one training task and a light one
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "airflow" / "passwords.json"),
        # Our processes run as `airflow …` from PATH, as standalone starts them: this venv's first.
        "PATH": f"{AIRFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.update(extra or {})
    return env


def _stop(procs: dict[str, subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM each service's process group (workers included), then SIGKILL what is left."""
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with suppress(ProcessLookupError):  # children the service left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def airflow_stack(
    home: Path,
    *,
    services: Sequence[str] = STANDALONE,
    extra_env: dict[str, str] | None = None,
    migrate: bool = True,
) -> Iterator[AirflowStack]:
    """Start Airflow on the embedded home ``home`` (SD_PIPELINE_HOME); stop it all on exit.

    The user ``admin`` (role Admin) gets a fresh random password (``stack.password``), as
    `airflow standalone` does. On an error inside the block the services' log tails are
    printed, so a failing test shows why.
    """
    port = free_port()
    env = stack_env(home, port, extra_env)
    airflow_home = Path(env["AIRFLOW_HOME"])
    airflow_home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).write_text(json.dumps({"admin": password}))
    logs = home / "logs" / "airflow-services"
    logs.mkdir(parents=True, exist_ok=True)
    if migrate:
        out = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    stack = AirflowStack(env=env, port=port, logs=logs, username="admin", password=password)
    try:
        for name in services:
            cmd = [str(AIRFLOW), name] + (["--port", str(port)] if name == "api-server" else [])
            with (logs / f"{name}.log").open("wb") as log:
                stack.procs[name] = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        stack.wait_healthy()
        yield stack
    except Exception:
        print(stack.service_logs(), file=sys.stderr)
        raise
    finally:
        _stop(stack.procs)
