"""Sources: what a configured source yields, one record per input, and how it is opened.

Every input (a metadata line, an image file, a URL) becomes exactly one ``SourceItem``
(bytes and caption to check further) or one ``SourceRejection`` (a reason code and a
sentence), never neither: ingest counts on it to account for every input.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from sd_pipeline.config import SourceConfig

log = logging.getLogger("sd_pipeline.ingest")

LIST_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class SourceItem:
    source: str  # path relative to the source root as the metadata names it, or the URL
    data: bytes
    caption: str
    extra: dict[str, Any] = field(default_factory=dict)  # carried metadata columns


@dataclass(frozen=True)
class SourceRejection:
    source: str
    reason: str  # short stable code, listed in docs/ingest.md
    detail: str  # a sentence for a person


class ReadRefused(Exception):
    """One input could not or must not be read; it ends in quarantine with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Record = SourceItem | SourceRejection
# A record whose bytes are still to be fetched: readers yield these so that slow reads
# (S3 objects, URLs) run concurrently while the order of records stays the input order.
Deferred = Callable[[], Record]


def resolve_in_order(records: Iterable[Record | Deferred], workers: int) -> Iterator[Record]:
    """Run the deferred reads on ``workers`` threads, yielding records in input order.

    At most ``4 * workers`` reads are in flight or waiting, so memory stays bounded by
    that many images however long the source is.
    """
    if workers <= 1:
        for record in records:
            yield record if isinstance(record, SourceItem | SourceRejection) else record()
        return
    window: deque[Record | Future[Record]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="sd-source") as pool:
        try:
            for record in records:
                window.append(
                    record if isinstance(record, SourceItem | SourceRejection) else pool.submit(record)
                )
                while len(window) > 4 * workers:
                    yield _result(window.popleft())
            while window:
                yield _result(window.popleft())
        finally:
            for pending in window:  # the consumer stopped early: drop what is queued
                if isinstance(pending, Future):
                    pending.cancel()


def _result(entry: Record | Future[Record]) -> Record:
    return entry.result() if isinstance(entry, Future) else entry


def detect_kind(source: SourceConfig, endpoint_url: str | None = None) -> str:
    """The kind a source is read as: its own, or for ``auto`` what its URI looks like."""
    if source.kind != "auto":
        return source.kind
    path = urlparse(source.uri).path.rstrip("/")
    if any(path.lower().endswith(suffix) for suffix in LIST_SUFFIXES):
        return "urls"
    from sd_pipeline.ingest.imagefolder import open_folder

    folder = open_folder(source.uri, endpoint_url=endpoint_url)
    return "imagefolder" if folder.metadata_names() else "sidecar"


@dataclass(frozen=True)
class SourceRecords:
    """A source's inputs before any image bytes are read: what a planner counts and slices."""

    kind: str
    records: Iterator[Record | Deferred]
    read_workers: int  # reads worth running at once for this source
    portable: bool = False  # deferred reads may run in another process (local files, URLs)


def source_records(source: SourceConfig, *, endpoint_url: str | None = None) -> SourceRecords:
    """Every input of the configured source as one record or deferred read, in a stable order.

    Listing and metadata parsing happen here; image bytes are read only when a deferred
    record is called, so iterating (to count, or to skip to a unit's range) is cheap.
    ``endpoint_url`` is the storage endpoint, used for an ``s3://`` source unless the
    source names its own.
    """
    endpoint = source.endpoint_url or endpoint_url
    kind = detect_kind(source, endpoint)
    if kind == "urls":
        from sd_pipeline.ingest.download import DownloadPolicy, read_url_lists

        records = read_url_lists(
            source.uri,
            DownloadPolicy.from_config(source),
            url_column=source.url_column,
            caption_column=source.caption_column,
            list_format=source.list_format,
            endpoint_url=endpoint,
        )
        # Downloads need nothing of this process: the worker processes run them (portable).
        return SourceRecords(kind, records, source.read_workers, portable=True)

    from sd_pipeline.ingest.imagefolder import LocalFolder, imagefolder_records, open_folder, sidecar_records

    folder = open_folder(source.uri, endpoint_url=endpoint, max_bytes=source.max_bytes)
    if kind == "imagefolder":
        records = imagefolder_records(folder)
    else:
        records = sidecar_records(folder, caption_extension=source.caption_extension)
    portable = isinstance(folder, LocalFolder)
    return SourceRecords(kind, records, min(source.read_workers, folder.max_concurrency), portable)


def iter_source(source: SourceConfig, *, endpoint_url: str | None = None) -> Iterator[Record]:
    """Every input of the configured source as one record, read, in a stable order."""
    found = source_records(source, endpoint_url=endpoint_url)
    log.info("reading %s source %s", found.kind, source.uri)
    return _logged(resolve_in_order(found.records, found.read_workers), found.kind, source.uri)


def _logged(records: Iterator[Record], kind: str, uri: str) -> Iterator[Record]:
    """Pass records through; log one line with counts and rate once the source is read."""
    started = time.perf_counter()
    items = 0
    reasons: Counter[str] = Counter()
    for record in records:
        if isinstance(record, SourceItem):
            items += 1
        else:
            reasons[record.reason] += 1
        yield record
    seconds = time.perf_counter() - started
    total = items + sum(reasons.values())
    log.info(
        "read %s source %s: %d inputs, %d read, %d refused %s in %.1fs (%.0f inputs/s)",
        kind,
        uri,
        total,
        items,
        sum(reasons.values()),
        dict(sorted(reasons.items())),
        seconds,
        total / max(seconds, 1e-9),
    )


# -- tabular metadata: metadata.jsonl / metadata.csv and URL lists share these rules ------


def printable(text: str) -> str:
    """``text`` safe to store: bytes that were not UTF-8 shown as ``\\xNN`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8 (or lone surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def carried(value: Any) -> Any:
    """A metadata value as carried into the manifest: text stays text, other JSON values
    become their JSON text, so one column never mixes types across rows."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


Row = tuple[str, dict[str, Any] | None, SourceRejection | None]  # (where, row, or why not)


def jsonl_rows(lines: Iterable[bytes], label: str) -> Iterator[Row]:
    """One row per non-blank line of a JSON Lines file; ``where`` is ``label:<line>``."""
    for lineno, raw in enumerate(lines, start=1):
        where = f"{label}:{lineno}"
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if not raw.strip():
            continue
        # Bytes that are not UTF-8 survive as surrogates, so the fields they sit in can be
        # named; is_utf8 refuses them later, field by field.
        text = raw.decode("utf-8", "surrogateescape")
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            yield (
                where,
                None,
                SourceRejection(
                    where,
                    "bad_metadata",
                    f"line {lineno} of {label} is not JSON ({err.msg} at column {err.colno})",
                ),
            )
            continue
        if not isinstance(row, dict):
            yield (
                where,
                None,
                SourceRejection(
                    where,
                    "bad_metadata",
                    f"line {lineno} of {label} is a JSON {type(row).__name__}, not an object",
                ),
            )
            continue
        yield where, row, None


def csv_rows(lines: Iterable[bytes], label: str, required: str) -> Iterator[Row]:
    """One row per record of a CSV file with a header; ``where`` is ``label:<first line>``.

    Raises ValueError when the header lacks the ``required`` column: then no row can be
    used and the source is misconfigured, not one row bad.
    """
    text = (raw.decode("utf-8", "surrogateescape") for raw in lines)
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    if header:
        header[0] = header[0].removeprefix("\ufeff")
    if required not in header:
        raise ValueError(
            f"{label} has columns {[printable(h) for h in header]} but no {required!r}; "
            f"name the column {required!r} or set the column name in dataset.source"
        )
    start = reader.line_num + 1
    while True:
        where = f"{label}:{start}"
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            start = reader.line_num + 1
            yield where, None, SourceRejection(where, "bad_metadata", f"{where} is not valid CSV: {err}")
            continue
        start = reader.line_num + 1
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            yield (
                where,
                None,
                SourceRejection(
                    where,
                    "bad_metadata",
                    f"{where} has {len(fields)} fields but the header has {len(header)}",
                ),
            )
            continue
        yield where, dict(zip(header, fields, strict=True)), None
