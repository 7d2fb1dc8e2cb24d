"""Which failures are worth a retry: the one place that classifies exceptions.

Transient: S3 throttling, connection errors and 5xx answers (botocore), network timeouts,
a busy database, a pod that could not be scheduled or was evicted. A retry, later, can
succeed. Everything else is permanent: a failed quality gate, a config error, a missing
input, a bug. Retrying those only delays the alert, so they fail at once.

Two enforcement points share :func:`classify`: :func:`fail_fast` turns a permanent error
raised in our task bodies into ``AirflowFailException`` (Airflow then skips the retries),
and :class:`TransientOnly`, the ``retry_policy`` of every task through ``DEFAULT_ARGS``,
does the same for operators we do not write (the GPU pod, the approval). Nothing heavy is
imported here: exceptions are recognised by class name and attributes, so parsing a DAG
never loads botocore or the Kubernetes client.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context

# botocore's own lists (botocore.retries.standard): by the time one reaches us, botocore has
# spent its retries, so Airflow's later and longer backoff is the next thing to try.
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
})
TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "InternalError", "InternalFailure", "ServiceUnavailable",
    "Unavailable", "ServerError", "500", "502", "503", "504",
})
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

# Exception classes (by name, anywhere in the class hierarchy) that are transient.
TRANSIENT_CLASSES = frozenset({
    # botocore: no answer, or no whole answer
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "HTTPClientError",
    # urllib3 / requests / http.client underneath boto3, MLflow and the Kubernetes client
    "ProtocolError", "NewConnectionError", "MaxRetryError", "IncompleteRead", "RemoteDisconnected",
    "ChunkedEncodingError", "Timeout",
    # Python's own
    "ConnectionError", "TimeoutError",
    # cncf.kubernetes: the pod waited for a node (GPU scale-up) or its image longer than allowed
    "PodLaunchTimeoutException", "PodCredentialsExpiredFailure",
})
TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
})
# Known permanent classes, named so the log says why rather than "not known to be transient".
PERMANENT_CLASSES = {
    "QualityGateFailed": "the dataset version failed its quality gate",
    "GateFailed": "the dataset version failed its quality gate",
    "ConfigError": "the pipeline config is invalid",
    "ValidationError": "a value failed validation",
    "RegistryRefused": "the registry refused the request as asked",
    "ApprovalRefused": "the approval did not come from a registry approver",
    "FileNotFoundError": "an input does not exist",
    "NoSuchKey": "an S3 object does not exist",
    "NoSuchBucket": "an S3 bucket does not exist",
    "PermissionError": "permission denied",
    "NoCredentialsError": "no credentials were found",
}
PERMANENT_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "NoSuchKey",
    "ExpiredToken", "InvalidToken", "AllAccessDisabled", "InvalidBucketName", "404", "403",
})
# What a failed subprocess or pod prints: the real exception lived in another process, so
# only its text reaches us (compute.StageFailed, the pod operator's termination message).
TRANSIENT_TEXT = re.compile(
    r"An error occurred \((?:" + "|".join(sorted(THROTTLING_CODES | TRANSIENT_CODES)) + r")\)"
    r"|\b(?:EndpointConnectionError|ConnectionClosedError|ReadTimeoutError|ConnectTimeoutError)\b"
    r"|Could not connect to the endpoint URL|Connection reset by peer|Connection refused"
    r"|Pod took too long to (?:start|be scheduled)|\bEvicted\b|\bPreempt(?:ed|ing|ion)\b|NodeShutdown"
    r"|database is locked|Max retries exceeded with url",
)
MAX_CHAIN = 8


@dataclass(frozen=True)
class Classification:
    transient: bool
    reason: str


def _class_names(exc: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(exc).__mro__]


def _aws_error(exc: BaseException) -> tuple[str, int | None] | None:
    """(error code, HTTP status) of a botocore ClientError-like exception, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, int(status) if isinstance(status, int) else None


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of an API error: the Kubernetes client's ApiException (``status``),
    requests' HTTPError (``response.status_code``), MLflow's RestException."""
    candidates = [getattr(exc, "status", None), getattr(exc, "status_code", None),
                  getattr(getattr(exc, "response", None), "status_code", None)]
    getter = getattr(exc, "get_http_status_code", None)
    if callable(getter):
        with suppress(Exception):  # a status we cannot read is no status
            candidates.append(getter())
    return next((v for v in candidates if isinstance(v, int) and 100 <= v < 600), None)


MLFLOW_TRANSIENT = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"})
HTTP_ERRORS = frozenset(
    {"ApiException", "RestException", "HTTPError", "MlflowException", "KubernetesApiError"}
)


def _classify_one(exc: BaseException) -> Classification | None:
    """Classify one exception by itself; None when it does not say."""
    names = _class_names(exc)
    aws = _aws_error(exc)
    if aws is not None:
        code, status = aws
        if code in THROTTLING_CODES:
            return Classification(True, f"S3/AWS throttling ({code})")
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
            return Classification(True, f"S3/AWS server error ({code or status}, HTTP {status})")
        return Classification(False, f"S3/AWS refused the request ({code}, HTTP {status})")
    for name in names:
        if name in PERMANENT_CLASSES:
            return Classification(False, PERMANENT_CLASSES[name])
    if "AirflowFailException" in names:
        return Classification(False, "the task asked not to be retried")
    if HTTP_ERRORS.intersection(names):
        if getattr(exc, "error_code", None) in MLFLOW_TRANSIENT:
            return Classification(True, f"the tracking server is unavailable ({exc.error_code})")  # type: ignore[attr-defined]
        status = _http_status(exc)
        if status in TRANSIENT_STATUS:
            return Classification(True, f"the server answered HTTP {status}")
    for name in names:
        if name in TRANSIENT_CLASSES:
            return Classification(True, f"network or service unavailable ({names[0]})")
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return Classification(True, f"network error ({errno.errorcode.get(exc.errno or 0, exc.errno)})")
    match = TRANSIENT_TEXT.search(str(exc))
    if match:
        return Classification(True, f"the failure reads as transient ({match.group(0)!r})")
    return None


def classify(exc: BaseException) -> Classification:
    """Transient (retry later) or permanent (fail now), and why, for any exception.

    The exception and its explicit causes (``raise … from``) are examined in turn; the first
    that says either way decides. What nothing recognises is permanent: only failures known
    to pass are worth the wait.
    """
    seen: BaseException | None = exc
    for _ in range(MAX_CHAIN):
        if seen is None:
            break
        found = _classify_one(seen)
        if found is not None:
            return found
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return Classification(False, f"{type(exc).__name__} is not a known transient error")


def is_transient(exc: BaseException) -> bool:
    return classify(exc).transient


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what an alert or a log summary shows."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class GateFailed(AirflowFailException):
    """A dataset version failed its quality gate: never retried, alerted as its own kind."""

    def __init__(self, message: str, verdict: dict[str, Any]) -> None:
        super().__init__(message)
        self.verdict = verdict


class PermanentFailure(AirflowFailException):
    """A permanent error of a task body, wrapped by :func:`fail_fast`; ``__cause__`` is the error."""


def original(exc: BaseException) -> BaseException:
    """The error a :class:`PermanentFailure` wraps, else ``exc`` itself."""
    if isinstance(exc, PermanentFailure) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


# Exceptions that steer Airflow (skip, defer, fail now, wait for a person): pass them through.
_AIRFLOW_SIGNALS = (
    "AirflowFailException", "AirflowSkipException", "AirflowRescheduleException", "TaskDeferred",
    "DownstreamTasksSkipped", "TaskAwaitingInput", "AirflowTaskTerminated", "AirflowSensorTimeout",
    "DagRunTriggerException",
)


@contextmanager
def fail_fast(what: str) -> Iterator[None]:
    """Run a task body; a permanent error becomes AirflowFailException (no retries), a transient
    one propagates unchanged so the task's retries with backoff take it."""
    try:
        yield
    except BaseException as exc:
        if any(name in _AIRFLOW_SIGNALS for name in _class_names(exc)) or not isinstance(exc, Exception):
            raise
        verdict = classify(exc)
        if verdict.transient:
            raise
        raise PermanentFailure(
            f"{what} failed: {first_line(exc)} (permanent: {verdict.reason}; not retried)"
        ) from exc


class TransientOnly(RetryPolicy):
    """Retry policy of every task: retry (with the task's backoff) only transient failures."""

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Context | None = None
    ) -> RetryDecision:
        verdict = classify(exception)
        if verdict.transient:
            return RetryDecision.retry(reason=f"transient: {verdict.reason}; retrying with backoff")
        return RetryDecision.fail(reason=f"permanent: {verdict.reason}; not retried")

    def serialize(self) -> dict[str, Any]:
        return {"__type": "sd_pipeline.airflow.errors.TransientOnly"}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> TransientOnly:
        return cls()
