"""Which failures are retried: the classifier on real botocore exceptions (built by boto3 from real
HTTP answers of a local S3 stand-in, and from the moto S3 server), on a stage command that failed
in its own process, and the retry policy every DAG task carries."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sd_pipeline.airflow.errors import (
    GateFailed,
    PermanentFailure,
    TransientOnly,
    classify,
    fail_fast,
    is_transient,
)

REPO = Path(__file__).resolve().parent.parent

S3_ERROR = """<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>{message}</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"""


class _S3Answers(BaseHTTPRequestHandler):
    """Answers every S3 request with one fixed error, as S3 itself words it."""

    status = 503
    code = "SlowDown"
    message = "Please reduce your request rate."
    delay = 0.0

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        time.sleep(self.delay)
        body = S3_ERROR.format(code=self.code, message=self.message).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _answering(status: int, code: str, message: str, delay: float = 0.0) -> type[BaseHTTPRequestHandler]:
    attrs = {"status": status, "code": code, "message": message, "delay": delay}
    return type("Answers", (_S3Answers,), attrs)


@pytest.fixture
def throttling_s3() -> Iterator[str]:
    yield from _serve(_answering(503, "SlowDown", "Please reduce your request rate."))


@pytest.fixture
def failing_s3() -> Iterator[str]:
    yield from _serve(_answering(500, "InternalError", "We encountered an internal error. Please try again."))


@pytest.fixture
def slow_s3() -> Iterator[str]:
    yield from _serve(_answering(200, "", "", delay=3.0))


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for local servers only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _client(endpoint: str, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config))


def _raised(call: Any) -> BaseException:
    with pytest.raises(Exception) as err:
        call()
    return err.value


# -- transient: worth a later retry -------------------------------------------------------------


def test_s3_throttling_is_transient(aws_env: None, throttling_s3: str) -> None:
    from botocore.exceptions import ClientError

    err = _raised(lambda: _client(throttling_s3).put_object(Bucket="b", Key="k", Body=b"x"))
    assert isinstance(err, ClientError) and err.response["Error"]["Code"] == "SlowDown"
    verdict = classify(err)
    assert verdict.transient and verdict.reason == "S3/AWS throttling (SlowDown)"
    # HEAD has no body to name the code: botocore reports the bare status.
    head = _raised(lambda: _client(throttling_s3).head_object(Bucket="b", Key="k"))
    assert isinstance(head, ClientError) and head.response["Error"]["Code"] == "503"
    assert is_transient(head)


def test_s3_server_errors_are_transient(aws_env: None, failing_s3: str) -> None:
    err = _raised(lambda: _client(failing_s3).get_object(Bucket="b", Key="k"))
    assert classify(err).transient and "InternalError" in classify(err).reason


def test_connection_refused_and_read_timeouts_are_transient(aws_env: None, slow_s3: str) -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    refused = _raised(lambda: _client(closed).get_object(Bucket="b", Key="k"))
    assert isinstance(refused, EndpointConnectionError) and is_transient(refused)
    timeout = _raised(lambda: _client(slow_s3, read_timeout=0.5).get_object(Bucket="b", Key="k"))
    assert isinstance(timeout, ReadTimeoutError) and is_transient(timeout)


def test_a_store_error_caused_by_throttling_is_transient(aws_env: None, throttling_s3: str) -> None:
    """What our code raises on top of botocore is judged by its cause."""
    from sd_pipeline.storage import Store, StoreError

    try:
        try:
            Store.from_uri("s3://bucket/prefix", throttling_s3).get_bytes("datasets/x/LATEST")
        except Exception as err:
            raise StoreError("reading datasets/x/LATEST failed") from err
    except StoreError as err:
        assert classify(err).transient and classify(err).reason == "S3/AWS throttling (SlowDown)"


def test_a_stage_command_that_died_of_throttling_is_transient(
    aws_env: None, throttling_s3: str, home: Path
) -> None:
    """The local backend's subprocess hits throttled S3; only its output reaches the task."""
    from sd_pipeline.compute import StageFailed, run_local
    from sd_pipeline.config import parse_config

    config = home / "pipeline.json"
    storage = {"root": "s3://bucket/sd", "endpoint_url": throttling_s3}
    config.write_text(parse_config({"storage": storage}).to_json())
    err = _raised(lambda: run_local("register", str(config), "demo-0123456789ab",
                                    env={"AWS_MAX_ATTEMPTS": "1"}))
    assert isinstance(err, StageFailed)
    assert "503" in str(err) or "SlowDown" in str(err)
    assert classify(err).transient, str(err)[-2000:]


# -- permanent: fail now ------------------------------------------------------------------------


def test_missing_keys_buckets_and_bad_credentials_are_permanent(bucket: str, s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    missing_key = _raised(lambda: s3.get_object(Bucket=bucket, Key="no/such/key"))
    missing_bucket = _raised(lambda: s3.get_object(Bucket="no-such-bucket-here", Key="k"))
    assert not is_transient(missing_key) and "NoSuchKey" in classify(missing_key).reason
    assert not is_transient(missing_bucket) and "NoSuchBucket" in classify(missing_bucket).reason


def test_gate_config_and_input_errors_are_permanent() -> None:
    from sd_pipeline.config import ConfigError, parse_config
    from sd_pipeline.stages import QualityGateFailed

    config_error = _raised(lambda: parse_config({"train": {"steps": 0}}))
    assert isinstance(config_error, ConfigError)
    assert classify(config_error).reason == "the pipeline config is invalid"
    assert not is_transient(QualityGateFailed("dataset shapes version x failed its quality gate"))
    assert not is_transient(GateFailed("failed", {"failures": ["expect_x"]}))
    assert not is_transient(FileNotFoundError("runs/x/final is not committed"))
    assert classify(KeyError("model_version")).reason == "KeyError is not a known transient error"


def test_fail_fast_fails_permanent_errors_and_passes_transient_ones(
    aws_env: None, throttling_s3: str
) -> None:
    from botocore.exceptions import ClientError

    expected = r"register failed: FileNotFoundError: .* \(permanent: an input does not exist; not retried\)"
    with pytest.raises(PermanentFailure, match=expected), fail_fast("register"):
        raise FileNotFoundError("runs/x/final is not committed; train run x first")
    # unchanged: Airflow's retries take it
    with pytest.raises(ClientError), fail_fast("register"):
        _client(throttling_s3).put_object(Bucket="b", Key="k", Body=b"x")


def test_the_retry_policy_retries_only_transient_failures(aws_env: None, throttling_s3: str) -> None:
    from airflow.sdk.definitions.retry_policy import RetryAction

    from sd_pipeline.config import ConfigError

    policy = TransientOnly()
    throttled = _raised(lambda: _client(throttling_s3).put_object(Bucket="b", Key="k", Body=b"x"))
    retry = policy.evaluate(throttled, try_number=1, max_tries=4)
    assert retry.action == RetryAction.RETRY and retry.retry_delay is None  # the task's backoff applies
    fail = policy.evaluate(ConfigError("train.steps: must be >= 1"), try_number=1, max_tries=4)
    assert fail.action == RetryAction.FAIL and "the pipeline config is invalid" in (fail.reason or "")


def test_pod_scheduling_timeouts_are_transient_and_pod_failures_are_not() -> None:
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchTimeoutException
    from airflow.sdk.exceptions import AirflowException

    waited = PodLaunchTimeoutException("Pod took too long to be scheduled on the cluster, giving up. "
                                       "More than 1800s. Check the pod events in kubernetes.")
    assert classify(waited).transient
    crashed = AirflowException("Pod sd-train-abc returned a failure.\nremote_pod: {'exit_code': 1}")
    assert not classify(crashed).transient
    evicted = AirflowException("Pod sd-train-abc returned a failure.\nreason: Evicted (node low on memory)")
    assert classify(evicted).transient


# -- every task gets them ------------------------------------------------------------------------


def test_every_task_of_every_dag_retries_with_backoff_and_alerts(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from sd_pipeline.airflow.alerts import PipelineAlerts

    monkeypatch.setenv("AIRFLOW_HOME", str(home / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    for dag in bag.dags.values():
        for task in dag.tasks:
            where = f"{dag.dag_id}.{task.task_id}"
            assert task.retries >= 1 and task.retry_exponential_backoff > 1, where
            assert task.max_retry_delay is not None, where
            assert isinstance(task.retry_policy, TransientOnly), where
            assert any(isinstance(cb, PipelineAlerts) for cb in task.on_failure_callback), where
