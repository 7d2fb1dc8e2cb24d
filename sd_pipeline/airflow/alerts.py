"""Failure alerts: an Airflow notifier that says what failed, on which data, why, and where to look.

Every task's ``on_failure_callback`` (through ``DEFAULT_ARGS``) is :class:`PipelineAlerts`. It
reads ``alerts`` of the pipeline config when it fires, so the DAGs need no change to turn
alerts on, and sends one message through the Airflow connection ``alerts.connection_id``:

- webhook: a JSON POST to the connection's host (its password, if any, as a bearer token);
- slack: a Slack incoming-webhook payload (the connection's password holds the webhook URL
  or its ``T…/B…/…`` path, as in Airflow's Slack provider), plain HTTP;
- email: through Airflow's SMTP provider and that connection.

Two kinds: ``quality_gate_failed`` (a dataset version was rejected: the failed expectations
and the quality report) and ``task_failed`` (anything else, after its retries). A message
never carries the connection's login, password or URL, and known secrets are masked in the
cause text. Deliveries never follow a redirect (the token would go with it), and text from the
data is escaped for Slack so it cannot mention ``@channel`` or dress up a link.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseNotifier

from sd_pipeline.airflow.errors import GateFailed, classify, first_line, original

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context

    from sd_pipeline.config import AlertsConfig, PipelineConfig

log = logging.getLogger("sd_pipeline.alerts")

AlertKind = Literal["task_failed", "quality_gate_failed"]
Channel = Literal["webhook", "slack", "email"]
SLACK_DEFAULT_HOST = "https://hooks.slack.com/services"
# Tasks whose result names the data a DAG run works on: (task id, key of the dataset version).
VERSION_SOURCES = (
    ("prepare_run", "dataset_version"),
    ("commit", "version"),
    ("ingest", "version"),
    ("resolve_version", None),
)
DELIVERY_ATTEMPTS = 3
RUNBOOK = "docs/operations.md#alerts"


@dataclass
class Alert:
    """One alert, as every channel renders it."""

    kind: AlertKind
    title: str
    pipeline: str
    dag_id: str
    task_id: str
    airflow_run_id: str
    try_number: int
    cause: str
    action: str
    dataset: str | None = None
    dataset_version: str | None = None
    model_version: str | None = None
    failed_expectations: list[str] = field(default_factory=list)
    retry: str = ""
    links: dict[str, str] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {"source": "sd-pipeline", **asdict(self)}

    def lines(self) -> list[str]:
        """The alert as plain text lines (email body, Slack fallback, logs)."""
        data = f"{self.dataset}@{self.dataset_version}" if self.dataset_version else "not known yet"
        out = [
            self.title,
            f"step: {self.dag_id}.{self.task_id} (run {self.airflow_run_id}, try {self.try_number})",
            f"data: {data}",
            f"cause: {self.cause}",
        ]
        if self.model_version:
            out.append(f"model version: {self.model_version}")
        if self.failed_expectations:
            out.append("failed expectations: " + ", ".join(self.failed_expectations))
        if self.retry:
            out.append(f"retries: {self.retry}")
        out.append(f"what to do: {self.action}")
        out.extend(f"{name}: {url}" for name, url in self.links.items())
        return out


# -- building an alert from a failed task's context -------------------------------------------


def _absolute(url: str | None) -> str | None:
    """Links pushed by tasks may be paths of the Airflow API server; alerts leave Airflow."""
    if not url or "://" in url:
        return url
    base = os.environ.get("SD_PIPELINE_AIRFLOW_URL", "").rstrip("/")
    if not base:
        from airflow.sdk.configuration import conf

        base = str(conf.get("api", "base_url", fallback="http://localhost:8080/")).rstrip("/")
    return f"{base}/{url.lstrip('/')}"


def _pull(ti: Any, dag: Any, task_id: str, key: str = "return_value") -> Any:
    """An XCom of another task of this run, or None (never fails the alert)."""
    if dag is not None and task_id not in getattr(dag, "task_ids", ()):
        return None
    try:
        return ti.xcom_pull(task_ids=task_id, key=key)
    except Exception as err:  # noqa: BLE001 - a missing detail must not lose the alert
        log.debug("no XCom %s of %s: %s", key, task_id, err)
        return None


def _data_of_run(ti: Any, dag: Any) -> tuple[str | None, str | None, str | None]:
    """(dataset, dataset version, model version) that this DAG run works on, when known."""
    for task_id, key in VERSION_SOURCES:
        if task_id == ti.task_id:
            continue
        value = _pull(ti, dag, task_id)
        if isinstance(value, Mapping):
            version = value.get(key) if key else value.get("dataset_version")
            model = value.get("model_version")
            if version or model:
                return (
                    value.get("dataset"),
                    (str(version) if version else None),
                    (str(model) if model else None),
                )
    return None, None, None


def alert_from_context(context: Context | Mapping[str, Any], config: PipelineConfig) -> Alert:
    """The alert for the failed task in ``context`` (an Airflow task-failure context)."""
    ti = context["ti"]
    dag = context.get("dag")
    dag_run = context.get("dag_run")
    exc = context.get("exception")
    dataset, version, model_version = _data_of_run(ti, dag)
    links: dict[str, str] = {}
    log_url = getattr(ti, "log_url", None)
    if log_url:
        links["task_log"] = str(log_url)
    common: dict[str, Any] = {
        "pipeline": config.name,
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "airflow_run_id": str(getattr(dag_run, "run_id", None) or ti.run_id),
        "try_number": int(getattr(ti, "try_number", 1) or 1),
    }
    if isinstance(exc, GateFailed):
        gate = exc.verdict
        failed = [str(f) for f in gate.get("failures") or []]
        for name, key in (("quality_report", "report_uri"), ("data_card", "datacard_uri")):
            if gate.get(key):
                links[name] = _store_link(config, str(gate[key]))
        dataset = str(gate.get("dataset") or dataset or config.dataset.name)
        version = str(gate.get("version") or version)
        return Alert(
            kind="quality_gate_failed",
            title=f"Dataset {dataset} version {version} failed its quality gate",
            cause=f"{len(failed)} failed expectation(s): {', '.join(failed) or 'see the report'}",
            action="Open the quality report. LATEST did not move and nothing trained. Fix the data and "
            "ingest again, or, if a threshold is wrong, change it in the pipeline config and clear the "
            f"quality_gate task ({RUNBOOK}).",
            dataset=dataset,
            dataset_version=version,
            failed_expectations=failed,
            retry="none: a failed gate is not retried",
            links=links,
            **common,
        )
    for name in ("mlflow_run", "model_version"):  # known once the run is registered
        url = _pull(ti, dag, "register", f"sd_link_{name}")
        if url:
            links[name] = str(_absolute(str(url)))
    error = original(exc) if isinstance(exc, BaseException) else None  # not fail_fast's wrapper
    cause = first_line(error) if error is not None else "the task failed (no exception was recorded)"
    verdict = classify(error) if error is not None else None
    retries = int(getattr(getattr(ti, "task", None), "retries", 0) or 0)
    if verdict is None:
        retry = ""
    elif verdict.transient:
        retry = f"transient ({verdict.reason}); all {retries} retries used"
    else:
        retry = f"none: permanent ({verdict.reason})"
    subject = f" on {dataset or config.dataset.name}@{version}" if version else ""
    return Alert(
        kind="task_failed",
        title=f"{ti.dag_id}.{ti.task_id} failed{subject}",
        cause=cause,
        action="Open the task log. A permanent error needs a fix (config, data or code) and then "
        "'Clear' on the task; a transient one that outlasted its retries usually means a service "
        f"is down ({RUNBOOK}).",
        dataset=dataset or (config.dataset.name if version else None),
        dataset_version=version,
        model_version=model_version,
        retry=retry,
        links=links,
        **common,
    )


def _store_link(config: PipelineConfig, uri: str) -> str:
    """The report app's URL of a store object (absolute), else the object's URI."""
    from sd_pipeline.airflow.links import store_url

    return _absolute(store_url(config.storage.root, uri)) or uri


# -- keeping secrets out ------------------------------------------------------------------------

_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_ASSIGNED = re.compile(
    r"(?i)\b([A-Za-z0-9_]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[A-Za-z0-9_]*"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+"
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` without known secret values, URL credentials or ``password=…`` style values."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _USERINFO.sub("***@", text)
    return _ASSIGNED.sub(r"\1***", text)


def _secrets_of(conn: Connection) -> list[str]:
    values = [conn.password, conn.login if conn.password else None]
    if conn.password and "/" in conn.password:  # a Slack webhook path: its parts are the secret
        values.extend(part for part in conn.password.split("/") if len(part) >= 8)
    return [v for v in values if v]


def _redacted(alert: Alert, secrets: list[str]) -> Alert:
    alert.cause = redact(alert.cause, secrets)
    alert.title = redact(alert.title, secrets)
    return alert


# -- channels -----------------------------------------------------------------------------------


def channel_of(conn: Connection, kind: str) -> Channel:
    """The channel an alert takes: ``alerts.kind``, or (auto) the connection's type."""
    if kind != "auto":
        return kind  # type: ignore[return-value]
    conn_type = (conn.conn_type or "").lower().replace("-", "_")
    if conn_type in ("slackwebhook", "slack_webhook", "slack"):
        return "slack"
    if conn_type in ("smtp", "email"):
        return "email"
    return "webhook"


def webhook_url(conn: Connection) -> str:
    """The URL a webhook alert is POSTed to: the connection's host.

    A host holding a whole URL (``{"conn_type": "http", "host": "https://…/hook"}``) is used as
    is; otherwise the URL is built from host, port and path (``http://host:port/path`` as an
    ``AIRFLOW_CONN_*`` URI puts the path in ``schema``; ``schema`` http/https is the scheme,
    as Airflow's HTTP provider reads it).
    """
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(f"alert connection {conn.conn_id!r} has no host; set it to the webhook's URL")
    if "://" in host:
        return host
    schema = (conn.schema or "").strip("/")
    scheme = "https" if conn.conn_type == "https" or conn.port == 443 or schema == "https" else "http"
    path = "" if schema in ("", "http", "https") else f"/{schema}"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}{path}"


def slack_url(conn: Connection) -> str:
    """The incoming-webhook URL: the password (a URL, or the path after the host), else the host."""
    token = (conn.password or "").strip()
    if token.startswith(("https://", "http://")):
        return token
    host = (conn.host or "").strip() or SLACK_DEFAULT_HOST
    if "://" not in host:
        host = f"https://{host}"
    if token:
        return f"{host.rstrip('/')}/{token.lstrip('/')}"
    if host == SLACK_DEFAULT_HOST:
        raise ValueError(
            f"alert connection {conn.conn_id!r} has no webhook: put the Slack incoming-webhook URL "
            "(or its T…/B…/… path) in the connection's password"
        )
    return host


def webhook_headers(conn: Connection) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "sd-pipeline-alerts"}
    extra = conn.extra_dejson if conn.extra else {}
    headers.update({str(k): str(v) for k, v in (extra.get("headers") or {}).items()})
    if conn.login and conn.password:
        basic = base64.b64encode(f"{conn.login}:{conn.password}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    elif conn.password:
        headers["Authorization"] = f"Bearer {conn.password}"
    return headers


def _mrkdwn(text: str) -> str:
    """``text`` shown as written: Slack reads ``<!channel>``, ``<@U…>`` and ``<url|label>`` as
    controls, so a cause taken from data must not reach it unescaped (Slack's own three escapes)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, label: str) -> str:
    # A "|" in the URL would end it early and make the rest the label.
    return f"<{_mrkdwn(url).replace('|', '%7C')}|{_mrkdwn(label)}>"


def slack_payload(alert: Alert) -> dict[str, Any]:
    """A Slack incoming-webhook message: a fallback ``text`` and Block Kit blocks."""
    icon = ":no_entry:" if alert.kind == "quality_gate_failed" else ":rotating_light:"
    data = (
        f"`{_mrkdwn(f'{alert.dataset}@{alert.dataset_version}')}`"
        if alert.dataset_version
        else "not known yet"
    )
    fields = [
        f"*Step*\n`{_mrkdwn(f'{alert.dag_id}.{alert.task_id}')}` (try {alert.try_number})",
        f"*Data*\n{data}",
    ]
    if alert.model_version:
        fields.append(f"*Model version*\n{_mrkdwn(alert.model_version)}")
    if alert.retry:
        fields.append(f"*Retries*\n{_mrkdwn(alert.retry)}")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{alert.title}"[:150]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Cause*\n{_mrkdwn(alert.cause)}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*What to do*\n{_mrkdwn(alert.action)}"}},
    ]
    if alert.links:
        links = " · ".join(_slack_link(url, name.replace("_", " ")) for name, url in alert.links.items())
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": links}]})
    # The fallback text is what notifications show, and Slack parses it as mrkdwn too.
    return {"text": f"{icon} {_mrkdwn(alert.title)}: {_mrkdwn(alert.cause)}"[:3000], "blocks": blocks}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib would resend the Authorization header to wherever the
    Location points (another host included), so a 3xx surfaces as an HTTPError instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _post_json(url: str, payload: dict[str, Any], headers: dict[str, str], timeout: float) -> int:
    """POST with a few quick retries on transient failures; returns the HTTP status."""
    from sd_pipeline.airflow.errors import is_transient

    body = json.dumps(payload, default=str).encode()
    for attempt in range(1, DELIVERY_ATTEMPTS + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                # Not the Location: it may be anywhere, and the alert was not sent there.
                raise AlertNotSent(
                    f"the alert endpoint answered HTTP {err.code}, a redirect; alerts do not follow "
                    "redirects (they carry the connection's token): set the connection to the final URL"
                ) from None
            if err.code not in (429, 500, 502, 503, 504) or attempt == DELIVERY_ATTEMPTS:
                raise AlertNotSent(f"the alert endpoint answered HTTP {err.code}") from None
        except OSError as err:
            if not is_transient(err) or attempt == DELIVERY_ATTEMPTS:
                # The URL may carry a token (Slack): name the failure, not the address.
                raise AlertNotSent(f"the alert endpoint could not be reached: {type(err).__name__}") from None
        time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class AlertNotSent(RuntimeError):
    """An alert could not be delivered; the message names the reason, never the address."""


def _send_email(alert: Alert, conn_id: str, to: list[str]) -> None:
    if not to:
        raise AlertNotSent(f"connection {conn_id!r} is an e-mail connection but alerts.email_to is empty")
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    body = "<br>\n".join(html.escape(line) for line in alert.lines()[1:])
    links = "".join(
        f'<li><a href="{html.escape(url)}">{html.escape(name)}</a></li>' for name, url in alert.links.items()
    )
    with SmtpHook(smtp_conn_id=conn_id) as hook:
        hook.send_email_smtp(
            to=to,
            subject=f"[sd-pipeline] {alert.title}",
            html_content=f"<p><b>{html.escape(alert.title)}</b></p><p>{body}</p><ul>{links}</ul>",
        )


def deliver(alert: Alert, cfg: AlertsConfig) -> str:
    """Send ``alert`` through ``cfg.connection_id``; returns the channel used."""
    from airflow.sdk import BaseHook

    if not cfg.connection_id:
        raise AlertNotSent("alerts.connection_id is not set")
    conn = BaseHook.get_connection(cfg.connection_id)
    alert = _redacted(alert, _secrets_of(conn))
    channel = channel_of(conn, cfg.kind)
    if channel == "email":
        _send_email(alert, cfg.connection_id, list(cfg.email_to))
    elif channel == "slack":
        _post_json(
            slack_url(conn), slack_payload(alert), {"Content-Type": "application/json"}, cfg.timeout_seconds
        )
    else:
        _post_json(webhook_url(conn), alert.to_json(), webhook_headers(conn), cfg.timeout_seconds)
    return channel


class PipelineAlerts(BaseNotifier):
    """``on_failure_callback`` of every task: an alert per ``alerts`` of the pipeline config.

    The config is read when a task fails, not when the DAG is parsed, so the same callback
    serves every DAG and alerts turn on or off with the config alone.
    """

    def notify(self, context: Context) -> None:
        from sd_pipeline.airflow.settings import pipeline_config

        config = pipeline_config()
        cfg = config.alerts
        if not cfg.connection_id:
            log.info("alerts are off (alerts.connection_id is not set); no alert sent")
            return
        alert = alert_from_context(context, config)
        wanted = cfg.on_gate_failure if alert.kind == "quality_gate_failed" else cfg.on_task_failure
        if not wanted:
            log.info("%s alerts are turned off in alerts.*; not sending %r", alert.kind, alert.title)
            return
        try:
            channel = deliver(alert, cfg)
        except Exception as err:
            # Never the connection's address: a Slack URL is a secret.
            log.error(
                "could not send the %s alert through connection %r: %s",
                alert.kind,
                cfg.connection_id,
                redact(first_line(err)),
            )
            raise
        log.info(
            "sent %s alert through connection %r (%s): %s",
            alert.kind,
            cfg.connection_id,
            channel,
            alert.title,
        )
