"""Sources: folders (imagefolder, sidecar), S3 prefixes and URL lists; every input ends in one record.

Everything here is real: files and symlinks made in the tests, a moto S3 server and an
HTTP server on loopback addresses.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_pipeline.config import SourceConfig, parse_config
from sd_pipeline.ingest import download
from sd_pipeline.ingest.build import ingest
from sd_pipeline.ingest.download import DownloadPolicy, blocked_reason, robots_refusal
from sd_pipeline.ingest.sources import SourceItem, SourceRejection, iter_source
from sd_pipeline.ingest.versions import version_prefix
from sd_pipeline.storage import Store


def _png(seed: int, size: int = 48) -> bytes:
    """A noise image: every seed looks different to the near-duplicate hash."""
    img = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _records(**source: Any) -> dict[str, SourceItem | SourceRejection]:
    """Every record of a source by its ``source``; each input comes exactly once."""
    out: dict[str, SourceItem | SourceRejection] = {}
    for record in iter_source(SourceConfig(**source)):
        assert record.source not in out, f"{record.source} came twice"
        out[record.source] = record
    return out


def _reasons(records: dict[str, SourceItem | SourceRejection]) -> dict[str, str]:
    return {k: (v.reason if isinstance(v, SourceRejection) else "ok") for k, v in records.items()}


def _jsonl(rows: list[dict[str, Any] | bytes]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# -- local folders --------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A real image outside every source root: no source may read it."""
    path = tmp_path / "secret" / "outside.png"
    path.parent.mkdir()
    path.write_bytes(_png(99))
    return path


def test_imagefolder_jsonl_refuses_unsafe_paths_and_accounts_for_every_line(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / f"images/{i}.png").write_bytes(_png(i))
    (root / "images/unlisted.png").write_bytes(_png(10))
    (root / "images/link-out.png").symlink_to(outside)
    (root / "images/link-in.png").symlink_to(root / "images/0.png")
    (root / "sub-out").symlink_to(outside.parent, target_is_directory=True)
    os.mkfifo(root / "images/fifo.png")
    (root / "metadata.jsonl").write_bytes(_jsonl([
        {"file_name": "images/0.png", "text": "zero", "license": "cc0-1.0", "score": 0.5},
        {"file_name": "./images/1.png", "caption": "one", "tags": ["a", "b"]},
        {"file_name": "../secret/outside.png", "text": "climbs out"},
        {"file_name": "images/../../secret/outside.png", "text": "climbs out later"},
        {"file_name": str(outside), "text": "absolute"},
        {"file_name": "images/link-out.png", "text": "symlink leaving the root"},
        {"file_name": "sub-out/outside.png", "text": "through a symlinked folder"},
        {"file_name": "images/link-in.png", "text": "symlink inside the root"},
        {"file_name": "images/fifo.png", "text": "a pipe"},
        {"file_name": "images/gone.png", "text": "missing"},
        {"file_name": "images/2.png"},
        b'{"file_name": "images/2.png", "text": "caf\xe9 in latin-1"}',
        b'{"file_name": "images/0.png", "text": "again"}',
        b'{"file_name": "images/x.png", "text": ',
        b"[1, 2]",
        b"",
        b'{"text": "no file name"}',
    ]))
    records = _records(kind="imagefolder", uri=f"file://{root}")
    assert _reasons(records) == {
        "images/0.png": "ok",
        "./images/1.png": "ok",
        "../secret/outside.png": "path_traversal",
        "images/../../secret/outside.png": "path_traversal",
        str(outside): "absolute_path",
        "images/link-out.png": "symlink_escape",
        "sub-out/outside.png": "symlink_escape",
        "images/link-in.png": "ok",
        "images/fifo.png": "not_a_file",
        "images/gone.png": "missing_file",
        "images/2.png": "missing_caption",
        "metadata.jsonl:12": "duplicate_entry",
        "metadata.jsonl:13": "duplicate_entry",
        "metadata.jsonl:14": "bad_metadata",
        "metadata.jsonl:15": "bad_metadata",
        "metadata.jsonl:17": "bad_metadata",
        "images/unlisted.png": "unlisted_file",
    }
    zero, one = records["images/0.png"], records["./images/1.png"]
    assert isinstance(zero, SourceItem) and isinstance(one, SourceItem)
    assert zero.data == _png(0) and zero.caption == "zero"
    # Carried metadata is text, so one column never mixes types across rows.
    assert zero.extra == {"license": "cc0-1.0", "score": "0.5"}
    assert one.extra == {"tags": '["a", "b"]'}


def test_non_utf8_metadata_is_refused_by_field(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(i))
    (root / "metadata.jsonl").write_bytes(_jsonl([
        b'{"file_name": "0.png", "text": "caf\xe9"}',
        b'{"file_name": "1.png", "text": "fine", "author": "Jos\xe9"}',
        b'{"file_name": "2\xff.png", "text": "fine"}',
        {"file_name": "2.png", "text": "lone \ud800 surrogate"},
    ]))
    assert _reasons(_records(kind="imagefolder", uri=str(root))) == {
        "0.png": "bad_caption_encoding",
        "1.png": "bad_metadata_encoding",
        "metadata.jsonl:3": "bad_metadata_encoding",
        "2.png": "bad_caption_encoding",
    }


def test_imagefolder_csv_with_quoted_fields_and_bad_rows(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(_png(i))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text", "license"])
    writer.writerow(["0.jpg", "a cat, sitting", "cc-by-4.0"])
    writer.writerow(["1.jpg", "two\nlines", "cc0-1.0"])
    writer.writerow(["2.jpg", "too", "many", "fields"])
    writer.writerow(["../3.jpg", "up", "x"])
    data = b"\xef\xbb\xbf" + buf.getvalue().encode() + b"3.jpg,caf\xe9,x\r\n"
    (root / "metadata.csv").write_bytes(data)
    records = _records(uri=f"file://{root}")  # auto: a metadata file makes it an imagefolder
    assert _reasons(records) == {
        "0.jpg": "ok", "1.jpg": "ok", "metadata.csv:5": "bad_metadata", "../3.jpg": "path_traversal",
        "3.jpg": "bad_caption_encoding", "2.jpg": "unlisted_file",
    }
    zero, one = records["0.jpg"], records["1.jpg"]
    assert isinstance(zero, SourceItem) and isinstance(one, SourceItem)
    assert (zero.caption, zero.extra) == ("a cat, sitting", {"license": "cc-by-4.0"})
    assert one.caption == "two\nlines"  # ingest then refuses the control character


def test_a_folder_source_that_cannot_be_read_says_how_to_fix_it(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    (root / "metadata.csv").write_text("name,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"no 'file_name'"):
        _records(kind="imagefolder", uri=str(root))
    (root / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="has both metadata.jsonl and metadata.csv"):
        _records(kind="imagefolder", uri=str(root))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _records(kind="imagefolder", uri=str(tmp_path / "no-such-folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="kind: sidecar"):
        _records(kind="imagefolder", uri=str(empty))


def test_sidecar_captions_beside_images(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "kohya"
    (root / "10_cat").mkdir(parents=True)
    (root / "10_cat/a.jpg").write_bytes(_png(1))
    (root / "10_cat/a.txt").write_bytes("\ufeffa cat, sitting\nsecond line is ignored\n".encode())
    (root / "10_cat/b.png").write_bytes(_png(2))  # no caption
    (root / "10_cat/c.txt").write_text("no image")
    (root / "d.png").write_bytes(_png(4))
    (root / "d.txt").write_bytes(b"caf\xe9")
    (root / "e.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "e.txt").write_text("a vector")  # read; ingest refuses the format
    (root / "f.png").symlink_to(outside)
    (root / "f.txt").write_text("symlinked image")
    (root / "g.png").write_bytes(_png(7))
    (root / "g.txt").symlink_to(outside)
    (root / os.fsdecode(b"h\xff.png")).write_bytes(_png(8))
    (root / "notes.md").write_text("not an input")
    records = _records(kind="sidecar", uri=f"file://{root}")
    assert _reasons(records) == {
        "10_cat/a.jpg": "ok", "10_cat/b.png": "missing_caption", "10_cat/c.txt": "orphan_caption",
        "d.png": "bad_caption_encoding", "e.svg": "ok", "f.png": "symlink_escape",
        "g.png": "symlink_escape", "h\\xff.png": "bad_path_encoding",
    }
    a = records["10_cat/a.jpg"]
    assert isinstance(a, SourceItem) and (a.caption, a.extra) == ("a cat, sitting", {})
    assert _reasons(_records(uri=str(root))) == _reasons(records)  # auto: no metadata file


def test_files_above_the_byte_cap_are_not_read(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    big, small = _png(1, size=64), b"x" * 10
    (root / "big.png").write_bytes(big)
    (root / "big.txt").write_text("big")
    (root / "small.png").write_bytes(small)
    (root / "small.txt").write_text("small")
    assert _reasons(_records(kind="sidecar", uri=str(root), max_bytes=len(big) - 1)) == {
        "big.png": "too_large", "small.png": "ok"}


# -- S3 -------------------------------------------------------------------------------

def _put_tree(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def test_s3_imagefolder_and_sidecar(bucket: str, s3_env: str) -> None:
    _put_tree(bucket, "raw/day1", {
        "images/0.png": _png(0), "images/1.png": _png(1), "images/unlisted.png": _png(2),
        "metadata.jsonl": _jsonl([
            {"file_name": "images/0.png", "text": "zero", "license": "cc0-1.0"},
            {"file_name": "images/1.png", "text": "one"},
            {"file_name": "../day2/images/0.png", "text": "climbs out"},
            {"file_name": "/images/0.png", "text": "absolute"},
            {"file_name": "images/gone.png", "text": "missing"},
            b"not json",
        ]),
    })
    _put_tree(bucket, "raw/day2", {"a.png": _png(3), "a.txt": b"an a", "b.png": _png(4),
                                   "c.txt": b"orphan", "d.png": _png(5), "d.txt": b"\xff\xfe"})
    records = _records(kind="imagefolder", uri=f"s3://{bucket}/raw/day1", endpoint_url=s3_env)
    assert _reasons(records) == {
        "images/0.png": "ok", "images/1.png": "ok", "../day2/images/0.png": "path_traversal",
        "/images/0.png": "absolute_path", "images/gone.png": "missing_file",
        "metadata.jsonl:6": "bad_metadata", "images/unlisted.png": "unlisted_file",
    }
    zero = records["images/0.png"]
    assert isinstance(zero, SourceItem) and zero.data == _png(0) and zero.extra == {"license": "cc0-1.0"}
    # The endpoint also comes from AWS_ENDPOINT_URL; auto tells sidecar from imagefolder.
    assert _reasons(_records(uri=f"s3://{bucket}/raw/day2/", max_bytes=10**6)) == {
        "a.png": "ok", "b.png": "missing_caption", "c.txt": "orphan_caption",
        "d.png": "bad_caption_encoding"}
    assert _reasons(_records(uri=f"s3://{bucket}/raw/day2", max_bytes=10)) == {
        "a.png": "too_large", "b.png": "missing_caption", "c.txt": "orphan_caption",
        "d.png": "bad_caption_encoding"}


# -- URL lists ------------------------------------------------------------------------

HOST = "127.0.0.2"  # loopback, but not 127.0.0.1: tests can pretend it is public
BIG = 200_000


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 drops concurrent connects, which then time out
    hits: list[str]
    attempts: dict[str, int]

    def handle_error(self, request: Any, client_address: Any) -> None:  # resets are on purpose
        pass


_LOCK = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        path = self.path.split("?")[0]
        with _LOCK:
            attempt = self.server.attempts[self.path] = self.server.attempts.get(self.path, 0) + 1
        image = {"Content-Type": "image/png"}
        if path.startswith("/img/"):
            self._send(200, _png(int(path.rsplit("/", 1)[1].split(".")[0])), image)
        elif path == "/missing":
            self._send(404, b"not here")
        elif path == "/slow":
            time.sleep(3)
            self._send(200, _png(50), image)
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * BIG))
            self.end_headers()
            self.wfile.write(b"x" * 100)
        elif path == "/big-stream":  # no Content-Length: only the streaming cap can stop it
            self._send(200, b"x" * (BIG + 1000), image, length=False)
        elif path == "/noai":
            self._send(200, _png(51), {**image, "X-Robots-Tag": "noai"})
        elif path == "/scoped-to-us":
            self._send(200, _png(52), {**image, "X-Robots-Tag": "img2dataset: noimageai, nofollow"})
        elif path == "/scoped-to-others":
            self._send(200, _png(53), {**image, "X-Robots-Tag": "otherbot: noai"})
        elif path == "/redirect":
            self._send(302, headers={"Location": "/img/54.png"})
        elif path == "/redirect-private":
            self._send(302, headers={"Location": f"http://127.0.0.1:{self.server.server_port}/img/55.png"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/flaky" and attempt == 1:
            self._send(503, b"busy")
        elif path == "/flaky":
            self._send(200, _png(56), image)
        elif path == "/reset" and attempt == 1:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif path == "/reset":
            self._send(200, _png(57), image)
        else:
            self._send(500, b"broken")


@pytest.fixture(scope="module")
def http_server() -> Iterator[_Server]:
    server = _Server((HOST, 0), _Handler)
    server.hits, server.attempts = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _Server, path: str) -> str:
    return f"http://{HOST}:{server.server_port}{path}"


FAST = {"timeout_seconds": 1.0, "retries": 1, "retry_backoff_seconds": 0.05, "max_bytes": BIG}


def _write_list(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_url_list_downloads_with_a_reason_for_every_failure(tmp_path: Path, http_server: _Server) -> None:
    paths = {
        "/img/1.png": "ok", "/img/2.png": "ok", "/missing": "http_error", "/slow?1": "download_timeout",
        "/slow?2": "download_timeout", "/slow?3": "download_timeout",
        "/big-declared": "too_large", "/big-stream": "too_large", "/noai": "robots_noai",
        "/scoped-to-us": "robots_noai", "/scoped-to-others": "ok", "/redirect": "ok",
        "/loop": "too_many_redirects", "/flaky": "ok", "/reset": "ok", "/always-500": "http_error",
    }
    rows = [{"url": _url(http_server, p), "caption": f"caption of {p}", "similarity": 0.3}
            for p in paths]
    rows += [
        {"url": "ftp://example.com/a.png", "caption": "x", "similarity": 0.1},
        {"url": "http://[::1/", "caption": "x", "similarity": 0.1},
        {"url": "http://exa mple.com/a.png", "caption": "x", "similarity": 0.1},
        {"url": None, "caption": "no url", "similarity": 0.1},
        {"url": _url(http_server, "/img/3.png"), "caption": None, "similarity": 0.1},
        {"url": _url(http_server, "/img/4.png"), "caption": "  ", "similarity": 0.1},
        {"url": _url(http_server, "/img/1.png"), "caption": "listed twice", "similarity": 0.1},
    ]
    urls = _write_list(tmp_path / "urls.parquet", rows)
    started = time.perf_counter()
    records = _records(kind="urls", uri=f"file://{urls}", allow_private_networks=True, **FAST)
    seconds = time.perf_counter() - started
    expected = {_url(http_server, p): reason for p, reason in paths.items()}
    expected.update({
        "ftp://example.com/a.png": "bad_url", "http://[::1/": "bad_url",
        "http://exa mple.com/a.png": "bad_url", "urls.parquet:20": "bad_url",
        _url(http_server, "/img/3.png"): "missing_caption", _url(http_server, "/img/4.png"): "empty_caption",
        "urls.parquet:23": "duplicate_entry",
    })
    assert _reasons(records) == expected
    item = records[_url(http_server, "/img/1.png")]
    assert isinstance(item, SourceItem) and item.data == _png(1)
    assert item.extra == {"similarity": 0.3}  # parquet columns keep their type
    assert isinstance(redirected := records[_url(http_server, "/redirect")], SourceItem)
    assert redirected.data == _png(54)
    assert "HTTP 404" in records[_url(http_server, "/missing")].detail  # type: ignore[union-attr]
    assert "(2 attempts)" in records[_url(http_server, "/always-500")].detail  # type: ignore[union-attr]
    # Each slow URL takes two attempts of 1 s: in turn they would take 6 s, at once 2.
    assert seconds < 4.5, f"{seconds:.1f}s: the slow downloads did not overlap"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_url_lists_in_csv_and_jsonl_with_own_column_names(
    tmp_path: Path, http_server: _Server, suffix: str
) -> None:
    rows = [{"URL": _url(http_server, "/img/5.png"), "TEXT": "five", "LICENSE": "cc0-1.0"},
            {"URL": _url(http_server, "/missing"), "TEXT": "gone", "LICENSE": "cc0-1.0"}]
    urls = _write_list(tmp_path / f"list{suffix}", rows)
    records = _records(kind="urls", uri=str(urls), url_column="URL", caption_column="TEXT",
                       allow_private_networks=True, **FAST)
    assert _reasons(records) == {rows[0]["URL"]: "ok", rows[1]["URL"]: "http_error"}
    item = records[rows[0]["URL"]]
    assert isinstance(item, SourceItem) and (item.caption, item.extra) == ("five", {"LICENSE": "cc0-1.0"})


def test_private_addresses_are_refused_without_the_flag(tmp_path: Path, http_server: _Server) -> None:
    port = http_server.server_port
    urls = [f"http://127.0.0.1:{port}/img/60.png", f"http://localhost:{port}/img/61.png",
            f"http://[::1]:{port}/img/62.png", _url(http_server, "/img/63.png"),
            "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a.png", "http://[fd00:ec2::254]/"]
    path = _write_list(tmp_path / "urls.jsonl", [{"url": u, "caption": "x"} for u in urls])
    before = len(http_server.hits)
    records = iter_source(SourceConfig(kind="urls", uri=str(path), **FAST))
    assert {r.source: r.reason for r in records if isinstance(r, SourceRejection)} == dict.fromkeys(
        urls, "blocked_address")
    assert len(http_server.hits) == before  # refused before connecting


def test_a_redirect_to_a_private_address_is_refused(
    tmp_path: Path, http_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = download.blocked_reason
    monkeypatch.setattr(download, "blocked_reason", lambda address, allow=False:
                        None if address == HOST else real(address, allow))  # pretend HOST is public
    path = _write_list(tmp_path / "urls.jsonl", [
        {"url": _url(http_server, "/redirect-private"), "caption": "x"},
        {"url": _url(http_server, "/redirect"), "caption": "y"}])
    records = list(iter_source(SourceConfig(kind="urls", uri=str(path), **FAST)))
    reasons = [r.reason if isinstance(r, SourceRejection) else "ok" for r in records]
    assert reasons == ["blocked_address", "ok"]
    assert isinstance(records[0], SourceRejection) and "127.0.0.1" in records[0].detail


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Server, Path]]:
    """The same handler over TLS, with a self-signed certificate for images.test and HOST."""
    import datetime
    import ipaddress
    import ssl

    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now, day = datetime.datetime.now(datetime.UTC), datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("images.test"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server = _Server((HOST, 0), _Handler)
    server.hits, server.attempts = [], {}
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, folder / "cert.pem"
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_of_the_host_it_pinned(
    https_server: tuple[_Server, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    server, cert = https_server
    policy = DownloadPolicy(timeout=2.0, retries=0, allow_private_networks=True)
    with pytest.raises(download.ReadRefused) as err:  # self-signed: not trusted by default
        download.fetch(f"https://{HOST}:{server.server_port}/img/70.png", policy)
    assert err.value.reason == "tls_error"
    monkeypatch.setattr(download, "_TLS", ssl.create_default_context(cafile=str(cert)))
    monkeypatch.setattr(download, "resolve", lambda host, port: [HOST])
    # Connected to the checked address, verified against the name in the URL.
    assert download.fetch(f"https://images.test:{server.server_port}/img/71.png", policy) == _png(71)
    monkeypatch.setattr(download, "resolve", lambda host, port: [HOST] if host == "other.test" else [])
    with pytest.raises(download.ReadRefused) as err:
        download.fetch(f"https://other.test:{server.server_port}/img/72.png", policy)
    assert err.value.reason == "tls_error" and "other.test" in err.value.detail


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "resolve", lambda host, port: ["93.184.215.14", "127.0.0.1"])
    with pytest.raises(download.ReadRefused) as err:
        download.fetch("http://images.example.com/a.png", DownloadPolicy(timeout=0.5))
    assert err.value.reason == "blocked_address" and "127.0.0.1" in err.value.detail


@pytest.mark.parametrize("address, blocked", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.7", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "a cloud metadata service"),
    ("fd00:ec2::254", "a cloud metadata service"), ("100.100.100.200", "a cloud metadata service"),
    ("169.254.1.1", "link-local"), ("fe80::1%eth0", "link-local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "not publicly routable"),
    ("::ffff:127.0.0.1", "loopback (embedded in ::ffff:7f00:1)"), ("64:ff9b::a00:1", "private"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_blocked_addresses(address: str, blocked: str | None) -> None:
    why = blocked_reason(address)
    assert why == blocked or (blocked and why and why.startswith(blocked))
    if blocked == "a cloud metadata service":
        assert blocked_reason(address, allow_private_networks=True) == blocked  # never allowed
    elif blocked:
        assert blocked_reason(address, allow_private_networks=True) is None


@pytest.mark.parametrize("values, refused", [
    (["noai"], True), (["NoImageAI"], True), (["noindex, nofollow"], True), (["nofollow"], False),
    (["otherbot: noai"], False), (["img2dataset: noai"], True), (["sd-pipeline: noimageindex"], True),
    (["googlebot: noindex", "all"], False), ([], False),
])
def test_robots_directives_as_img2dataset_reads_them(values: list[str], refused: bool) -> None:
    assert (robots_refusal(values, DownloadPolicy()) is not None) == refused


# -- ingest over each source kind -----------------------------------------------------

def _ingest(tmp_path: Path, **source: Any) -> tuple[dict[str, Any], Any, Any]:
    cfg = parse_config({
        "storage": {"root": f"file://{tmp_path}/store"},
        "dataset": {"name": "mixed", "source": source, "workers": 1, "shard_size": 4,
                    "near_duplicate_distance": -1},
    })
    summary = ingest(cfg)
    store = Store.from_uri(cfg.storage.root)
    prefix = version_prefix("mixed", summary["version"])
    assert store.is_committed(prefix)
    manifest, quarantine = (pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/{n}.parquet"))).to_pandas()
                            for n in ("manifest", "quarantine"))
    assert summary["inputs"] == summary["accepted"] + summary["quarantined"]
    assert summary["inputs"] == len(manifest) + len(quarantine)
    return summary, manifest, quarantine


@pytest.mark.parametrize("layout", ["jsonl", "csv", "sidecar"])
def test_ingest_a_local_folder_of_each_layout(tmp_path: Path, outside: Path, layout: str) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    rows = [{"file_name": f"{i}.png", "text": f"picture {i}", "license": "cc0-1.0"} for i in range(5)]
    for i in range(5):
        (root / f"{i}.png").write_bytes(_png(i))
    (root / "bad.png").write_bytes(b"not an image")
    rows.append({"file_name": "bad.png", "text": "broken", "license": "cc0-1.0"})
    (root / "link.png").symlink_to(outside)
    rows.append({"file_name": "link.png", "text": "outside", "license": "cc0-1.0"})
    if layout == "sidecar":
        for row in rows:
            (root / row["file_name"]).with_suffix(".txt").write_text(row["text"])
    elif layout == "csv":
        _write_list(root / "metadata.csv", rows)
    else:
        _write_list(root / "metadata.jsonl", rows + [{"file_name": "../x.png", "text": "up", "license": ""}])
    summary, manifest, quarantine = _ingest(tmp_path, uri=f"file://{root}")
    assert summary["accepted"] == 5
    assert sorted(manifest["source"]) == [f"{i}.png" for i in range(5)]
    reasons = dict(zip(quarantine["source"], quarantine["reason"], strict=True))
    assert reasons["bad.png"] == "undecodable" and reasons["link.png"] == "symlink_escape"
    if layout != "sidecar":
        assert set(manifest["meta_license"]) == {"cc0-1.0"}
    if layout == "jsonl":
        assert reasons["../x.png"] == "path_traversal"


def test_ingest_from_s3(tmp_path: Path, bucket: str) -> None:
    files = {f"{i}.png": _png(i) for i in range(4)}
    files["metadata.jsonl"] = _jsonl([{"file_name": f"{i}.png", "text": f"s3 picture {i}"} for i in range(5)])
    _put_tree(bucket, "raw", files)
    summary, manifest, quarantine = _ingest(tmp_path, uri=f"s3://{bucket}/raw")
    assert (summary["accepted"], summary["quarantined"]) == (4, 1)
    assert quarantine["reason"].tolist() == ["missing_file"]


def test_ingest_from_a_url_list(tmp_path: Path, http_server: _Server) -> None:
    rows = [{"url": _url(http_server, f"/img/{i}.png"), "caption": f"web picture {i}", "LICENSE": "cc-by"}
            for i in range(20, 25)]
    rows += [{"url": _url(http_server, p), "caption": "bad", "LICENSE": "cc-by"}
             for p in ("/missing", "/noai")]
    urls = _write_list(tmp_path / "urls.parquet", rows)
    source = {"uri": f"file://{urls}", "allow_private_networks": True, **FAST}
    summary, manifest, quarantine = _ingest(tmp_path, **source)
    assert (summary["accepted"], summary["quarantined"]) == (5, 2)
    assert set(manifest["source"]) == {r["url"] for r in rows[:5]}
    assert set(manifest["meta_LICENSE"]) == {"cc-by"}
    assert sorted(quarantine["reason"]) == ["http_error", "robots_noai"]
    again, _, _ = _ingest(tmp_path, **source)
    assert (again["version"], again["created"]) == (summary["version"], False)
