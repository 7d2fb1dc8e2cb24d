"""URL downloads keep connections alive: fewer connects, the same checks.

A real HTTP/1.1 server on 127.0.0.2 counts the connections it accepts and the requests
it answers; the tests use the download code as ingest does (``fetch``), with a fresh
pool of kept connections each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sd_pipeline.ingest import download
from sd_pipeline.ingest.download import DownloadPolicy, KeptConnections, fetch
from sd_pipeline.ingest.sources import ReadRefused

HOST = "127.0.0.2"  # loopback: reachable only with allow_private_networks


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    connections: int
    requests: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:  # idle timeouts, on purpose
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keeps connections open unless told otherwise
    timeout = 0.3  # drops a connection idle this long, as real servers do (after seconds)

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path.startswith("/big"):
            body = b"x" * 5000
        elif self.path.startswith("/close"):
            body = b"closing"
            self.close_connection = True
        else:
            body = f"image at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/close"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server((HOST, 0), _Handler)
    srv.connections, srv.requests = 0, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeptConnections]:
    pool = KeptConnections(limit=4, max_idle=5.0)
    monkeypatch.setattr(download, "KEPT", pool)
    yield pool
    pool.close()


POLICY = DownloadPolicy(timeout=5.0, retries=0, allow_private_networks=True, max_bytes=1000)


def _url(server: _Server, path: str) -> str:
    return f"http://{HOST}:{server.server_port}{path}"


def test_one_connection_serves_a_run_of_urls(server: _Server, kept: KeptConnections) -> None:
    for i in range(10):
        assert fetch(_url(server, f"/img/{i}.png"), POLICY) == f"image at /img/{i}.png".encode()
    assert server.connections == 1 and len(server.requests) == 10
    assert len(kept) == 1


def test_a_connection_the_server_closes_is_not_kept(server: _Server, kept: KeptConnections) -> None:
    assert fetch(_url(server, "/close/1"), POLICY) == b"closing"
    assert len(kept) == 0
    assert fetch(_url(server, "/img/1.png"), POLICY) == b"image at /img/1.png"
    assert server.connections == 2


def test_a_kept_connection_the_server_dropped_is_replaced_without_using_an_attempt(
    server: _Server, kept: KeptConnections
) -> None:
    """retries=0: had the dropped connection cost an attempt, the second URL would fail."""
    fetch(_url(server, "/img/1.png"), POLICY)
    time.sleep(0.8)  # the server's idle timeout (0.3 s) passes: it closes its end
    assert fetch(_url(server, "/img/2.png"), POLICY) == b"image at /img/2.png"
    assert server.requests == ["/img/1.png", "/img/2.png"]
    assert server.connections == 2


def test_a_download_stopped_by_the_byte_cap_does_not_leave_its_connection_kept(
    server: _Server, kept: KeptConnections
) -> None:
    with pytest.raises(ReadRefused) as refused:
        fetch(_url(server, "/big"), POLICY)
    assert refused.value.reason == "too_large"
    assert len(kept) == 0


def test_reuse_never_skips_the_address_check(server: _Server, kept: KeptConnections) -> None:
    """A kept connection to a private address is not a way around the private-address
    refusal: the URL is resolved and checked before any kept connection is looked at."""
    fetch(_url(server, "/img/1.png"), POLICY)
    assert len(kept) == 1
    strict = DownloadPolicy(timeout=5.0, retries=0, allow_private_networks=False)
    with pytest.raises(ReadRefused) as refused:
        fetch(_url(server, "/img/2.png"), strict)
    assert refused.value.reason == "blocked_address"
    assert server.requests == ["/img/1.png"]


def test_a_kept_connection_is_handed_out_only_to_the_address_it_is_connected_to(
    server: _Server, kept: KeptConnections
) -> None:
    fetch(_url(server, "/img/1.png"), POLICY)
    key = ("http", HOST, server.server_port)
    # The host now resolves elsewhere: the kept connection is closed, not reused.
    assert kept.take(key, ["127.0.0.3"]) is None
    assert len(kept) == 0
    fetch(_url(server, "/img/2.png"), POLICY)
    conn = kept.take(key, [HOST])
    assert conn is not None and conn.peer == HOST
    conn.close()


def test_idle_connections_expire_and_the_pool_is_bounded(server: _Server) -> None:
    pool = KeptConnections(limit=2, max_idle=0.2)
    conns = []
    for i in range(3):
        conn = download._PinnedHTTP(HOST, server.server_port, [HOST], 5.0)
        conn.connect()
        conns.append(conn)
        pool.give(("http", HOST, 1000 + i), conn)
    assert len(pool) == 2 and conns[0].sock is None  # the longest idle was closed
    time.sleep(0.3)
    assert pool.take(("http", HOST, 1002), [HOST]) is None  # expired: closed, not handed out
    assert conns[2].sock is None
    pool.close()
    assert len(pool) == 0 and conns[1].sock is None


# -- downloads in the worker processes -------------------------------------------------


_ACTIVE = [0, 0]  # reads running now, most seen at once (per process)
_ACTIVE_LOCK = threading.Lock()


def _slow(value: str, delay: float) -> str:
    with _ACTIVE_LOCK:
        _ACTIVE[0] += 1
        _ACTIVE[1] = max(_ACTIVE)
    time.sleep(delay)
    with _ACTIVE_LOCK:
        _ACTIVE[0] -= 1
    return value


def _upper(job: tuple[int, str]) -> tuple[int, str, int]:
    """The job's read, upper-cased, and how many reads this process has seen at once."""
    return job[0], job[1].upper(), _ACTIVE[1]


def test_read_ahead_keeps_the_input_order_whatever_order_reads_finish_in() -> None:
    """Reads of a chunk run at once; the later ones finish first, results stay in order."""
    from functools import partial

    from sd_pipeline.ingest.workers import Workers

    jobs = [(i, (i, partial(_slow, f"r{i}", 0.02 * (5 - i % 6)))) for i in range(30)]
    with Workers(_upper, workers=2) as pool:
        out = list(pool.ordered(jobs, expected=30, read_ahead=8))
    assert [(tag, (i, r)) for tag, (i, r, _) in out] == [(i, (i, f"R{i}")) for i in range(30)]
    assert max(seen for _, (_, _, seen) in out) > 1  # reads overlapped


def _png(i: int) -> bytes:
    import io

    from PIL import Image

    img = Image.new("RGB", (64 + 8 * i, 48), (30 * i % 256, 90, 200 - 20 * i))
    img.paste((250, 250, 250), (4 * i, 8, 4 * i + 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _ImageHandler(_Handler):
    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path.startswith("/img/"):
            body, status, extra = _png(int(self.path.rsplit("/", 1)[1].split(".")[0])), 200, {}
        elif self.path == "/noai":
            body, status, extra = _png(9), 200, {"X-Robots-Tag": "noai"}
        else:
            body, status, extra = b"not here", 404, {}
        self.send_response(status)
        for k, v in {"Content-Type": "image/png", **extra}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_url_list_ingested_by_worker_processes_is_the_version_of_one_process(
    tmp_path: Path, kept: KeptConnections
) -> None:
    """Worker processes download their own inputs (read_ahead): same accepted set, same
    reasons, same version id as everything in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sd_pipeline.config import parse_config
    from sd_pipeline.ingest.build import ingest

    srv = _Server((HOST, 0), _ImageHandler)
    srv.connections, srv.requests = 0, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        paths = [f"/img/{i}.png" for i in range(7)] + ["/missing", "/noai", "/img/7.png"]
        rows = [{"url": _url(srv, p), "caption": f"picture at {p}"} for p in paths]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        summaries = []
        for workers in (1, 2):
            cfg = parse_config(
                {
                    "storage": {"root": f"file://{tmp_path}/store-{workers}"},
                    "dataset": {
                        "name": "web",
                        "source": {
                            "uri": f"file://{tmp_path}/urls.parquet",
                            "allow_private_networks": True,
                            "read_workers": 4,
                            "timeout_seconds": 5,
                        },
                        "resolution": 32,
                        "min_side": 16,
                        "workers": workers,
                        "near_duplicate_distance": -1,
                    },
                    "safety": {"classifier": None},
                }
            )
            summaries.append(ingest(cfg))
    finally:
        srv.shutdown()
        srv.server_close()
    one, two = summaries
    assert (one["accepted"], one["quarantined"]) == (8, 2)
    assert one["quarantine_reasons"] == two["quarantine_reasons"] == {"http_error": 1, "robots_noai": 1}
    assert two["version"] == one["version"]
