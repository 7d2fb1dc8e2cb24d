"""The URL-list source: rows of (url, caption) from parquet, CSV or JSONL, downloaded safely.

Safely means: only public addresses (every address a host resolves to is checked, again
after every redirect, and the connection goes to the checked address, so a second DNS
answer cannot swap it), a time limit and a byte cap per download, retries with backoff
on transient failures only, and the sites' ``X-Robots-Tag: noai`` opt-outs honoured as
img2dataset honours them. Standard library only.

Connections are kept alive and reused for the next URL on the same scheme, host and port
(HTTP/1.1, as browsers and HTTP libraries do): that saves a TCP (and TLS) handshake per
image on hosts that serve many images of a list. Reuse changes none of the checks: each
URL's host is resolved and checked again, and a kept connection is used only when the
address it is connected to is among the addresses just checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from sd_pipeline.ingest.sources import (
    LIST_SUFFIXES,
    Deferred,
    ReadRefused,
    Record,
    Row,
    SourceItem,
    SourceRejection,
    carried,
    csv_rows,
    is_utf8,
    jsonl_rows,
    printable,
)

if TYPE_CHECKING:
    from sd_pipeline.config import SourceConfig

log = logging.getLogger("sd_pipeline.ingest")

REDIRECTS = {301, 302, 303, 307, 308}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
# Cloud instance-metadata services: refused even with allow_private_networks, since a
# URL list never has a reason to reach them and they hand out credentials.
METADATA_SERVICES = {
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST = re.compile(r"[A-Za-z0-9._:-]+")  # after IDNA encoding; IPv6 literals without brackets


@dataclass(frozen=True)
class DownloadPolicy:
    timeout: float = 10.0  # per attempt: connect, headers and the whole body
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 64 * 2**20
    max_redirects: int = 5
    allow_private_networks: bool = False
    robots_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
    robots_user_agents: frozenset[str] = frozenset({"sd-pipeline", "img2dataset"})
    user_agent: str = "sd-pipeline/0.1 (image dataset ingestion; honours X-Robots-Tag noai)"

    @classmethod
    def from_config(cls, source: SourceConfig) -> DownloadPolicy:
        return cls(
            timeout=source.timeout_seconds,
            retries=source.retries,
            backoff=source.retry_backoff_seconds,
            max_bytes=source.max_bytes,
            max_redirects=source.max_redirects,
            allow_private_networks=source.allow_private_networks,
            robots_directives=frozenset(d.lower() for d in source.robots_directives),
            robots_user_agents=frozenset(a.lower() for a in source.robots_user_agents),
            user_agent=source.user_agent,
        )


class _Transient(ReadRefused):
    """A failure worth another attempt: the same request may well succeed later."""


# -- addresses ------------------------------------------------------------------------


def blocked_reason(address: str, allow_private_networks: bool = False) -> str | None:
    """Why a download must not connect to ``address``, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip in METADATA_SERVICES:
        return "a cloud metadata service"
    if allow_private_networks:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(str(embedded))
            return f"{inner} (embedded in {ip})" if inner else None
    for test, why in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
    ):
        if test:
            return why
    if not ip.is_global:
        return "not publicly routable"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _public_addresses(url: str, host: str, port: int, policy: DownloadPolicy) -> list[str]:
    try:
        addresses = resolve(host, port)
    except socket.gaierror as err:
        cls = _Transient if err.errno == socket.EAI_AGAIN else ReadRefused
        raise cls("dns_error", f"{host} in {url} does not resolve: {err.strerror}") from None
    for address in addresses:  # every one: the connection may end up on any of them
        why = blocked_reason(address, policy.allow_private_networks)
        if why:
            raise ReadRefused(
                "blocked_address",
                f"{host} in {url} resolves to {address}, {why}; "
                "set dataset.source.allow_private_networks for trusted internal lists",
            )
    if not addresses:
        raise ReadRefused("dns_error", f"{host} in {url} resolves to no address")
    return addresses


def _connect_any(addresses: Sequence[str], port: int, timeout: float | None) -> tuple[socket.socket, str]:
    """A connected socket and the address it is connected to."""
    last: OSError | None = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, address
        except OSError as err:
            last = err
    raise last or OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to addresses already checked, never to a fresh DNS answer; ``peer`` is the
    address it connected to (what a later reuse is checked against)."""

    peer: str | None = None

    def __init__(self, host: str, port: int, addresses: Sequence[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock, self.peer = _connect_any(self.addresses, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    peer: str | None = None

    def __init__(
        self, host: str, port: int, addresses: Sequence[str], timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.addresses = addresses
        self.tls = context

    def connect(self) -> None:
        sock, self.peer = _connect_any(self.addresses, self.port, self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)  # checks the certificate


_TLS = ssl.create_default_context()
_Conn = _PinnedHTTP | _PinnedHTTPS
_Key = tuple[str, str, int]  # scheme, host, port


class KeptConnections:
    """Connections whose last response was read to its end and not marked ``Connection:
    close``, kept for the next request to the same scheme, host and port.

    A kept connection is handed out only when the address it is connected to is among the
    addresses the new URL's host was just resolved to and checked against (so the private
    address checks hold for reused connections too), and only while it has been idle less
    than ``max_idle`` seconds (servers drop idle connections after a few seconds; one that
    did anyway is retried once on a fresh connection). At most ``limit`` are kept.
    Thread-safe: a connection is used by one download at a time.
    """

    def __init__(self, limit: int = 64, max_idle: float = 4.0) -> None:
        self.limit, self.max_idle = limit, max_idle
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[tuple[float, _Conn]]] = {}
        self._count = 0
        self._swept = time.monotonic()

    def take(self, key: _Key, addresses: Sequence[str]) -> _Conn | None:
        stale: list[_Conn] = []
        found: _Conn | None = None
        now = time.monotonic()
        with self._lock:
            kept = self._idle.get(key)
            while kept and found is None:
                since, conn = kept.pop()
                self._count -= 1
                if now - since < self.max_idle and conn.peer in addresses and conn.sock is not None:
                    found = conn
                else:
                    stale.append(conn)
            if kept is not None and not kept:
                del self._idle[key]
        for conn in stale:
            conn.close()
        return found

    def give(self, key: _Key, conn: _Conn) -> None:
        dropped: list[_Conn] = []
        now = time.monotonic()
        with self._lock:
            if now - self._swept > self.max_idle:  # so no process keeps idle sockets for long
                self._swept = now
                for k in list(self._idle):
                    fresh = [(since, c) for since, c in self._idle[k] if now - since < self.max_idle]
                    dropped += [c for since, c in self._idle[k] if now - since >= self.max_idle]
                    if fresh:
                        self._idle[k] = fresh
                    else:
                        del self._idle[k]
                self._count = sum(len(v) for v in self._idle.values())
            if self._count >= self.limit:  # drop the longest idle one
                k = min(self._idle, key=lambda k: self._idle[k][0][0])
                dropped.append(self._idle[k].pop(0)[1])
                self._count -= 1
                if not self._idle[k]:
                    del self._idle[k]
            self._idle.setdefault(key, []).append((now, conn))
            self._count += 1
        for old in dropped:
            old.close()

    def close(self) -> None:
        """Close every kept connection (the end of a list's downloads)."""
        with self._lock:
            kept = [conn for conns in self._idle.values() for _, conn in conns]
            self._idle.clear()
            self._count = 0
        for conn in kept:
            conn.close()

    def __len__(self) -> int:
        return self._count


KEPT = KeptConnections()
# A kept connection the server closed while it was idle fails like this before any
# response arrives; the request is then sent once more on a fresh connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


# -- one download ---------------------------------------------------------------------


def robots_refusal(values: Iterable[str], policy: DownloadPolicy) -> str | None:
    """The X-Robots-Tag value that opts the image out for us, or None.

    A value may be scoped to one agent (``otherbot: noai``); it applies only when the agent
    is one of ``policy.robots_user_agents``. Unscoped values apply to everyone.
    """
    for value in values:
        scope, sep, directives = value.partition(":")
        if sep and scope.strip().lower() not in policy.robots_user_agents:
            continue
        said = {d.strip().lower() for d in (directives if sep else value).split(",")}
        if said & policy.robots_directives:
            return value.strip()
    return None


def _request_target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL, or ReadRefused bad_url."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as err:
        raise ReadRefused("bad_url", f"{printable(url)} is not a valid URL: {err}") from None
    if parts.scheme not in ("http", "https"):
        raise ReadRefused("bad_url", f"{printable(url)} is not an http(s) URL")
    if not host:
        raise ReadRefused("bad_url", f"{printable(url)} has no host")
    if not _HOST.fullmatch(host):
        raise ReadRefused("bad_url", f"{printable(url)} has characters no host name can hold")
    if parts.username or parts.password:
        raise ReadRefused("bad_url", f"{printable(url)} carries credentials; they are not sent")
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, host, port or default, path + (f"?{query}" if query else "")


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Transient("download_timeout", f"{url} did not finish downloading within the time limit")
    return left


def _request(conn: _Conn, target: str, policy: DownloadPolicy, timeout: float) -> http.client.HTTPResponse:
    conn.timeout = timeout
    if conn.sock is not None:  # a kept connection: its last request left another timeout
        conn.sock.settimeout(timeout)
    conn.request(
        "GET",
        target,
        headers={
            "User-Agent": policy.user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        },
    )
    return conn.getresponse()


def _fetch_once(url: str, policy: DownloadPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout
    current = url
    for _hop in range(policy.max_redirects + 1):
        scheme, host, port, target = _request_target(current)
        addresses = _public_addresses(current, host, port, policy)
        timeout = _remaining(deadline, current)
        key = (scheme, host, port)
        kept = KEPT.take(key, addresses)
        conn: _Conn = kept or (
            _PinnedHTTPS(host, port, addresses, timeout, _TLS)
            if scheme == "https"
            else _PinnedHTTP(host, port, addresses, timeout)
        )
        reusable = False
        try:
            try:
                response = _request(conn, target, policy, timeout)
            except _STALE:
                if kept is None:
                    raise
                conn.close()  # the server closed it while it was kept: once more, fresh
                conn = (
                    _PinnedHTTPS(host, port, addresses, timeout, _TLS)
                    if scheme == "https"
                    else _PinnedHTTP(host, port, addresses, timeout)
                )
                response = _request(conn, target, policy, _remaining(deadline, current))
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise ReadRefused(
                        "http_error", f"HTTP {response.status} from {current} without a Location to follow"
                    )
                current = urljoin(current, location.strip())
                continue
            if not 200 <= response.status < 300:
                cls = _Transient if response.status in RETRY_STATUSES else ReadRefused
                raise cls("http_error", f"HTTP {response.status} {response.reason} from {current}")
            opt_out = robots_refusal(response.headers.get_all("X-Robots-Tag") or [], policy)
            if opt_out:
                raise ReadRefused(
                    "robots_noai",
                    f"{current} answered X-Robots-Tag: {opt_out}; the site "
                    "opts this image out of AI use (dataset.source.robots_directives)",
                )
            body = _read_capped(response, conn, current, deadline, policy.max_bytes)
            # Read to its end on a connection the server keeps open: fit for the next URL.
            reusable = response.isclosed() and not response.will_close and conn.sock is not None
            return body
        except TimeoutError:
            raise _Transient(
                "download_timeout",
                f"{current} did not answer within dataset.source.timeout_seconds={policy.timeout}",
            ) from None
        except ssl.SSLError as err:
            raise ReadRefused("tls_error", f"TLS with {host} failed: {err.reason or err}") from None
        except (ConnectionError, http.client.IncompleteRead) as err:
            raise _Transient("connection_error", f"{current}: {type(err).__name__}: {err}") from None
        except http.client.InvalidURL as err:
            raise ReadRefused("bad_url", f"{printable(current)}: {err}") from None
        except http.client.HTTPException as err:
            raise ReadRefused(
                "connection_error", f"{current} sent an invalid HTTP response: {type(err).__name__}"
            ) from None
        except OSError as err:
            raise _Transient("connection_error", f"{current}: {err.strerror or err}") from None
        finally:
            if reusable:
                KEPT.give(key, conn)
            else:  # redirects, refusals and errors: the rest of the response is not read
                conn.close()
    raise ReadRefused(
        "too_many_redirects",
        f"{url} redirects more than dataset.source.max_redirects={policy.max_redirects} times",
    )


def _read_capped(
    response: http.client.HTTPResponse,
    conn: http.client.HTTPConnection,
    url: str,
    deadline: float,
    max_bytes: int,
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ReadRefused(
            "too_large",
            f"{url} is {int(declared)} bytes (Content-Length), above "
            f"dataset.source.max_bytes={max_bytes}; it was not downloaded",
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        if conn.sock is not None:
            conn.sock.settimeout(_remaining(deadline, url))
        chunk = response.read(min(1 << 16, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise ReadRefused(
                "too_large",
                f"{url} sent more than dataset.source.max_bytes={max_bytes} bytes; the download was stopped",
            )


def fetch(url: str, policy: DownloadPolicy) -> bytes:
    """The body of ``url``, or ReadRefused with a reason code; transient failures are retried."""
    attempt = 0
    while True:
        try:
            return _fetch_once(url, policy)
        except _Transient as err:
            if attempt >= policy.retries:
                detail = err.detail + (f" ({attempt + 1} attempts)" if attempt else "")
                raise ReadRefused(err.reason, detail) from None
            time.sleep(policy.backoff * 2**attempt)
            attempt += 1


# -- the list -------------------------------------------------------------------------


def _list_format(name: str, list_format: str) -> str:
    if list_format != "auto":
        return list_format
    fmt = LIST_SUFFIXES.get(PurePosixPath(name).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of URL list {name!r} from its suffix; name it "
            ".parquet, .csv or .jsonl or set dataset.source.list_format"
        )
    return fmt


@contextmanager
def _local_copy(store: Any, key: str) -> Iterator[Path]:
    """A URL list in S3, spooled to a temporary file: parquet needs to seek."""
    fd, tmp = tempfile.mkstemp(prefix="sd-urls-", suffix=PurePosixPath(key).suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            store.client.download_fileobj(store.bucket, store._key(key), fh)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


@contextmanager
def _list_files(uri: str, list_format: str, endpoint_url: str | None) -> Iterator[list[tuple[str, Any]]]:
    """(label, opener) per list file of ``uri``: a file, or every list file in a folder/prefix."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        from sd_pipeline.storage import S3Store

        path = parts.path.strip("/")
        is_file = list_format != "auto" or PurePosixPath(path).suffix.lower() in LIST_SUFFIXES
        if is_file:
            parent, _, name = path.rpartition("/")
            store = S3Store(parts.netloc, parent, endpoint_url=endpoint_url)
            keys = [name]
        else:
            store = S3Store(parts.netloc, path, endpoint_url=endpoint_url)
            keys = [k for k in store.list("") if PurePosixPath(k).suffix.lower() in LIST_SUFFIXES]
        yield [(key, partial(_local_copy, store, key)) for key in keys]
        return
    root = Path(parts.path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LIST_SUFFIXES)
        yield [(p.relative_to(root).as_posix(), partial(_existing, p)) for p in files]
    elif root.is_file():
        yield [(root.name, partial(_existing, root))]
    else:
        raise FileNotFoundError(f"URL list {uri} does not exist; check dataset.source.uri")


@contextmanager
def _existing(path: Path) -> Iterator[Path]:
    yield path


def _parquet_rows(path: Path, label: str, url_column: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if url_column not in table.schema_arrow.names:
        raise ValueError(
            f"{label} has columns {table.schema_arrow.names} but no {url_column!r}; "
            "set dataset.source.url_column"
        )
    n = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{label}:{n}", row, None


def _rows(path: Path, label: str, fmt: str, url_column: str) -> Iterator[Row]:
    if fmt == "parquet":
        yield from _parquet_rows(path, label, url_column)
        return
    with path.open("rb") as fh:
        yield from (csv_rows(fh, label, required=url_column) if fmt == "csv" else jsonl_rows(fh, label))


def _download(url: str, caption: str, extra: dict[str, Any], policy: DownloadPolicy) -> Record:
    try:
        return SourceItem(url, fetch(url, policy), caption, extra)
    except ReadRefused as err:
        return SourceRejection(url, err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - one odd URL must not end a long ingest
        log.warning("unexpected failure downloading %s", url, exc_info=True)
        return SourceRejection(
            url, "download_failed", f"{url}: unexpected {type(err).__name__}: {err}; please report it"
        )


def read_url_lists(
    uri: str,
    policy: DownloadPolicy,
    *,
    url_column: str = "url",
    caption_column: str = "caption",
    list_format: str = "auto",
    endpoint_url: str | None = None,
) -> Iterator[Record | Deferred]:
    """Records of a URL list (or a folder of them): one per row, downloads deferred.

    A row's ``source`` is its URL; a row without a usable URL is ``<list>:<row>``.
    """
    seen: set[str] = set()
    with _list_files(uri, list_format, endpoint_url) as files:
        for label, opener in files:
            fmt = _list_format(label, list_format)
            with opener() as path:
                for where, row, problem in _rows(path, label, fmt, url_column):
                    if problem is not None or row is None:
                        yield problem or SourceRejection(where, "bad_metadata", f"{where} is not a row")
                        continue
                    yield _url_record(where, row, seen, policy, url_column, caption_column, fmt)


def _url_record(
    where: str,
    row: dict[str, Any],
    seen: set[str],
    policy: DownloadPolicy,
    url_column: str,
    caption_column: str,
    fmt: str,
) -> Record | Deferred:
    url = row.get(url_column)
    if not isinstance(url, str) or not url.strip():
        return SourceRejection(where, "bad_url", f"{where} has no {url_column!r} string")
    url = url.strip()
    if not is_utf8(url):
        return SourceRejection(where, "bad_url", f"the URL on {where} is not UTF-8: {printable(url)}")
    if url in seen:
        return SourceRejection(where, "duplicate_entry", f"{url} is listed again on {where}")
    seen.add(url)
    caption = row.get(caption_column)
    if not isinstance(caption, str):
        return SourceRejection(url, "missing_caption", f"{where} has no {caption_column!r} string")
    if not is_utf8(caption):
        return SourceRejection(url, "bad_caption_encoding", f"the caption on {where} is not UTF-8")
    if not caption.strip():  # not worth a download
        return SourceRejection(url, "empty_caption", f"{url}: caption is empty or whitespace only")
    # Parquet columns have one type each; JSONL/CSV values are carried as text.
    extra = {
        k: (v if fmt == "parquet" else carried(v))
        for k, v in row.items()
        if k not in (url_column, caption_column)
    }
    bad = [k for k, v in extra.items() if isinstance(v, str) and not is_utf8(v)]
    if bad:
        return SourceRejection(url, "bad_metadata_encoding", f"column {bad[0]!r} on {where} is not UTF-8")
    return partial(_download, url, caption, extra, policy)
