"""Failure alerts delivered for real: a webhook and a Slack-style endpoint on 127.0.0.1, an SMTP
server on 127.0.0.1, connections given as AIRFLOW_CONN_* variables, and Airflow itself
running a DAG whose quality gate fails (or whose first task cannot find its data)."""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from airflow_stack import dags_env

from sd_pipeline.airflow.alerts import (
    Alert,
    channel_of,
    deliver,
    redact,
    slack_payload,
    slack_url,
    webhook_url,
)
from sd_pipeline.config import AlertsConfig

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cr3t-alert-token-123"  # a dummy secret: it must reach the header, never a body or a log
SLACK_PATH = "T0000TEST/B0000TEST/abcdefghijklmnopqrstuvwx"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    url: str
    received: list[Received] = field(default_factory=list)
    status: int = 200
    location: str | None = None  # sent with a 3xx status


@contextmanager
def _serving() -> Iterator[Endpoint]:
    """An HTTP server on 127.0.0.1 that records every request (any method) and answers ``status``."""
    ep = Endpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ep.received.append(Received(self.path, dict(self.headers.items()), body))
            self.send_response(ep.status)
            if ep.location:
                self.send_header("Location", ep.location)
            self.end_headers()
            self.wfile.write(b"ok")

        do_POST = do_GET = _record  # noqa: N815 - http.server's names

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ep.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ep
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    with _serving() as ep:
        yield ep


@pytest.fixture
def elsewhere() -> Iterator[Endpoint]:
    """A second server: where a redirect points."""
    with _serving() as ep:
        yield ep


class _SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) for smtplib: greeting, EHLO, MAIL, RCPT, DATA, QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 127.0.0.1 test SMTP\r\n")
        envelope: dict[str, Any] = {"to": []}
        while line := self.rfile.readline():
            verb = line.strip().split(b" ", 1)[0].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 127.0.0.1\r\n")
            elif verb == b"MAIL":
                envelope["from"] = line.decode().strip()
                self.wfile.write(b"250 OK\r\n")
            elif verb == b"RCPT":
                envelope["to"].append(line.decode().split(":", 1)[1].strip(" <>\r\n"))
                self.wfile.write(b"250 OK\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 end with .\r\n")
                data = []
                while (chunk := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                    data.append(chunk)
                self.server.messages.append({**envelope, "data": b"".join(data)})  # type: ignore[attr-defined]
                self.wfile.write(b"250 OK queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 OK\r\n")


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPHandler)
    server.messages = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], server.messages  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def _alert(**overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "kind": "task_failed",
        "title": "sd_train.train failed on shapes@0123456789abcdef",
        "pipeline": "demo",
        "dag_id": "sd_train",
        "task_id": "train",
        "airflow_run_id": "manual__2026-11-27",
        "try_number": 4,
        "cause": f"StageFailed: upload to https://user:{TOKEN}@minio.local/x failed, password={TOKEN}",
        "action": "Open the task log.",
        "dataset": "shapes",
        "dataset_version": "0123456789abcdef",
        "retry": "transient (S3/AWS throttling (SlowDown)); all 3 retries used",
        "links": {"task_log": "http://airflow.local/dags/sd_train/runs/x/tasks/train?try_number=4"},
    }
    return Alert(**{**fields, **overrides})


def _connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, value: dict[str, Any] | str) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", text)


# -- where an alert goes, from the connection alone ----------------------------------------------


def test_the_channel_and_url_come_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import BaseHook

    _connection(monkeypatch, "hook_uri", "http://127.0.0.1:8123/alerts/in")
    _connection(monkeypatch, "hook_json", {"conn_type": "http", "host": "https://ops.example.com/hook"})
    _connection(monkeypatch, "slack", {"conn_type": "slackwebhook", "password": SLACK_PATH})
    _connection(monkeypatch, "mail", {"conn_type": "smtp", "host": "127.0.0.1", "port": 25})
    uri, full, slack, mail = (BaseHook.get_connection(c) for c in ("hook_uri", "hook_json", "slack", "mail"))
    assert (channel_of(uri, "auto"), webhook_url(uri)) == ("webhook", "http://127.0.0.1:8123/alerts/in")
    assert webhook_url(full) == "https://ops.example.com/hook"
    assert channel_of(slack, "auto") == "slack"
    assert slack_url(slack) == f"https://hooks.slack.com/services/{SLACK_PATH}"
    assert channel_of(mail, "auto") == "email"
    assert channel_of(uri, "slack") == "slack"  # alerts.kind wins over the type


def test_a_config_error_names_the_alert_fields() -> None:
    from sd_pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="alerts.kind is email but alerts.email_to is empty"):
        parse_config({"alerts": {"connection_id": "mail", "kind": "email"}})
    with pytest.raises(ConfigError, match="alerts.kind"):
        parse_config({"alerts": {"kind": "pager"}})
    assert parse_config({}).alerts.connection_id is None  # alerts are off by default


def test_secrets_are_masked_in_the_cause() -> None:
    text = redact(f"GET https://bob:{TOKEN}@s3.local/k failed; api_key={TOKEN} token: abcdef123", [])
    assert TOKEN not in text and "abcdef123" not in text
    assert "https://***@s3.local/k" in text
    assert redact("webhook T0000TEST/B0000TEST/xyz1234567 refused", ["xyz1234567"]) == (
        "webhook T0000TEST/B0000TEST/*** refused"
    )


# -- delivery, for real ------------------------------------------------------------------------


def test_a_webhook_alert_is_posted_as_json_with_the_token_only_in_the_header(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    _connection(
        monkeypatch, "sd_alerts", {"conn_type": "http", "host": f"{endpoint.url}/hook", "password": TOKEN}
    )
    assert deliver(_alert(), AlertsConfig(connection_id="sd_alerts")) == "webhook"
    [got] = endpoint.received
    assert got.path == "/hook"
    assert got.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN.encode() not in got.body
    payload = got.json()
    assert payload["source"] == "sd-pipeline" and payload["kind"] == "task_failed"
    assert (payload["dag_id"], payload["task_id"]) == ("sd_train", "train")
    assert payload["dataset_version"] == "0123456789abcdef"
    assert payload["cause"].startswith("StageFailed: upload to https://***@minio.local/x")
    assert payload["links"]["task_log"].startswith("http://airflow.local/")


def test_a_slack_alert_is_an_incoming_webhook_message(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    _connection(
        monkeypatch,
        "slack_alerts",
        {"conn_type": "slackwebhook", "host": f"{endpoint.url}/services", "password": SLACK_PATH},
    )
    gate = _alert(
        kind="quality_gate_failed",
        title="Dataset shapes version 0123456789abcdef failed its quality gate",
        cause="1 failed expectation(s): expect_table_row_count_to_be_between",
        failed_expectations=["expect_table_row_count_to_be_between"],
        links={"quality_report": "http://airflow.local/sd-pipeline/store/x/quality/index.html"},
    )
    assert deliver(gate, AlertsConfig(connection_id="slack_alerts")) == "slack"
    [got] = endpoint.received
    assert got.path == f"/services/{SLACK_PATH}"
    message = got.json()
    assert message == slack_payload(gate)
    assert message["text"].startswith(":no_entry: Dataset shapes version 0123456789abcdef failed")
    blocks = json.dumps(message["blocks"])
    assert "expect_table_row_count_to_be_between" in blocks and "<http://airflow.local/sd-pipeline" in blocks
    assert SLACK_PATH.split("/")[-1] not in got.body.decode()


def test_an_unreachable_or_failing_endpoint_is_reported_without_its_address(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_pipeline.airflow.alerts import AlertNotSent

    endpoint.status = 403
    _connection(monkeypatch, "sd_alerts", {"conn_type": "http", "host": f"{endpoint.url}/{SLACK_PATH}"})
    with pytest.raises(AlertNotSent, match="HTTP 403") as err:
        deliver(_alert(), AlertsConfig(connection_id="sd_alerts"))
    assert SLACK_PATH not in str(err.value) and len(endpoint.received) == 1  # 403 is not retried


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery_and_the_token_does_not_follow_it(
    status: int, endpoint: Endpoint, elsewhere: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_pipeline.airflow.alerts import AlertNotSent

    endpoint.status, endpoint.location = status, f"{elsewhere.url}/collect"
    _connection(
        monkeypatch, "sd_alerts", {"conn_type": "http", "host": f"{endpoint.url}/hook", "password": TOKEN}
    )
    with pytest.raises(AlertNotSent, match=f"HTTP {status}.*redirect") as err:
        deliver(_alert(), AlertsConfig(connection_id="sd_alerts"))
    assert len(endpoint.received) == 1  # a redirect is not retried either
    assert elsewhere.received == [], "the alert (and its bearer token) followed the redirect"
    assert elsewhere.url not in str(err.value)


def test_slack_text_from_the_data_cannot_mention_or_spoof_links(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    _connection(
        monkeypatch,
        "slack_alerts",
        {"conn_type": "slackwebhook", "host": f"{endpoint.url}/services", "password": SLACK_PATH},
    )
    hostile = _alert(
        title="sd_train.train failed on <!channel>@v1",
        cause="ValueError: caption <http://evil.example|click here> & <@U123> <!here>",
        dataset="<!everyone>",
        model_version="<http://evil.example|v2>",
        links={"task_log": "http://airflow.local/x?a=1&b=<2>|spoof"},
    )
    assert deliver(hostile, AlertsConfig(connection_id="slack_alerts")) == "slack"
    [got] = endpoint.received
    message = got.json()
    mrkdwn = [message["text"]] + [
        t["text"]
        for b in message["blocks"]
        for t in [b.get("text") or {}, *b.get("fields", []), *b.get("elements", [])]
        if t.get("type") == "mrkdwn"
    ]
    for text in mrkdwn:
        for raw in ("<!channel>", "<!here>", "<!everyone>", "<@U123>", "<http://evil.example|"):
            assert raw not in text, (raw, text)
    assert message["text"] == (
        ":rotating_light: sd_train.train failed on &lt;!channel&gt;@v1: ValueError: caption "
        "&lt;http://evil.example|click here&gt; &amp; &lt;@U123&gt; &lt;!here&gt;"
    )
    links = message["blocks"][-1]["elements"][0]["text"]
    assert links == "<http://airflow.local/x?a=1&amp;b=&lt;2&gt;%7Cspoof|task log>"


def test_an_email_alert_goes_through_the_smtp_connection(
    smtp_server: tuple[int, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, messages = smtp_server
    _connection(
        monkeypatch,
        "mail",
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "extra": {
                "disable_ssl": True,
                "disable_tls": True,
                "from_email": "airflow@example.com",
                "retry_limit": 0,
            },
        },
    )
    cfg = AlertsConfig(connection_id="mail", email_to=["oncall@example.com"])
    assert deliver(_alert(), cfg) == "email"
    [mail] = messages
    assert mail["to"] == ["oncall@example.com"]
    msg = message_from_bytes(mail["data"])
    assert msg["Subject"] == "[sd-pipeline] sd_train.train failed on shapes@0123456789abcdef"
    html = next(p for p in msg.walk() if p.get_content_type() == "text/html").get_payload(decode=True)
    assert b"data: shapes@0123456789abcdef" in html and TOKEN.encode() not in html


# -- through Airflow ---------------------------------------------------------------------------

TI_PROBE = r"""
import json, sys
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    rows = s.query(TaskInstance).filter(TaskInstance.dag_id == sys.argv[1]).all()
    print(json.dumps({r.task_id: [str(r.state), r.try_number] for r in rows}))
"""


def airflow_env(home: Path, config: Path) -> dict[str, str]:
    return {**dags_env(home, config), "AIRFLOW__API__BASE_URL": "http://airflow.example.com:8080"}


def dags_test(dag_id: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [str(bin_dir / "airflow"), "dags", "test", dag_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    probe = subprocess.run(
        [sys.executable, "-c", TI_PROBE, dag_id], env=env, capture_output=True, text=True, check=True
    )
    return out, json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_failed_gate_in_airflow_alerts_once_and_is_not_retried(home: Path, endpoint: Endpoint) -> None:
    from sd_pipeline.quality.safety import build_tiny_safety_classifier
    from sd_pipeline.synthetic import generate_shapes_dataset

    config = home / "strict.yaml"
    config.write_text(
        (REPO / "configs" / "demo.yaml").read_text().replace("min_rows: 100", "min_rows: 100000")
        + "alerts:\n  connection_id: sd_alerts\n"
    )
    generate_shapes_dataset(home / "raw" / "shapes", count=60)
    build_tiny_safety_classifier(home / "models" / "safety-tiny")
    env = {
        **airflow_env(home, config),
        "AIRFLOW_CONN_SD_ALERTS": json.dumps(
            {"conn_type": "http", "host": f"{endpoint.url}/hook", "password": TOKEN}
        ),
    }
    out, tis = dags_test("sd_ingest", env)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "failed its quality gate" in log, log[-4000:]

    # Not retried: one try, failed for good (with retries=3 a retry would be up_for_retry).
    assert tis["quality_gate"] == ["failed", 1]
    [got] = endpoint.received
    alert = got.json()
    [version] = [p.name for p in (home / "store" / "datasets" / "shapes" / "versions").iterdir()]
    assert alert["kind"] == "quality_gate_failed"
    assert (alert["dag_id"], alert["task_id"], alert["try_number"]) == ("sd_ingest", "quality_gate", 1)
    assert (alert["dataset"], alert["dataset_version"]) == ("shapes", version)
    versions = home / "store" / "datasets" / "shapes" / "versions"
    rejected = json.loads((versions / version / "REJECTED").read_text())
    failed = rejected["failures"]
    assert "expect_table_row_count_to_be_between" in failed and alert["failed_expectations"] == failed
    assert alert["cause"] == f"{len(failed)} failed expectation(s): {', '.join(failed)}"
    assert alert["links"]["task_log"].startswith("http://airflow.example.com:8080/dags/sd_ingest/runs/")
    assert alert["links"]["quality_report"] == (
        f"http://airflow.example.com:8080/sd-pipeline/store/datasets/shapes/versions/{version}/quality/index.html"
    )
    assert alert["retry"] == "none: a failed gate is not retried"
    assert got.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in got.body.decode() and TOKEN not in log


@pytest.mark.slow
def test_a_task_failure_in_airflow_alerts_with_its_cause(home: Path, endpoint: Endpoint) -> None:
    """sd_train with no accepted dataset: prepare_run fails for good, and says why."""
    config = home / "pipeline.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text() + "alerts:\n  connection_id: sd_alerts\n")
    env = {**airflow_env(home, config), "AIRFLOW_CONN_SD_ALERTS": f"{endpoint.url}/in"}
    out, tis = dags_test("sd_train", env)
    assert out.returncode != 0
    assert tis["prepare_run"] == ["failed", 1]  # a missing dataset is permanent: not retried
    [got] = endpoint.received
    alert = got.json()
    assert got.path == "/in"
    assert alert["kind"] == "task_failed"
    assert alert["title"] == "sd_train.prepare_run failed"
    assert alert["cause"].startswith("StoreError: dataset 'shapes' has no accepted version yet")
    assert alert["retry"] == "none: permanent (StoreError is not a known transient error)"
    assert alert["dataset_version"] is None
