"""Folder sources, local or ``s3://``: Hugging Face imagefolder and kohya-style sidecar captions.

imagefolder: images plus one ``metadata.jsonl`` or ``metadata.csv`` at the root, a row per
image with ``file_name`` and ``text`` (or ``caption``); other columns are carried.
sidecar: ``name.txt`` beside ``name.jpg``, no metadata file. Every metadata line and every
image file becomes exactly one record. Nothing outside the source root is ever read:
names that climb out (``../x.jpg``), absolute names and symlinks leaving the root are
refused with their own reason codes.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlparse

from sd_pipeline.ingest.sources import (
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
    resolve_in_order,
)

__all__ = [
    "CAPTION_KEYS",
    "IMAGE_SUFFIXES",
    "INPUT_SUFFIXES",
    "METADATA_FILES",
    "Folder",
    "LocalFolder",
    "S3Folder",
    "SourceItem",
    "SourceRejection",
    "imagefolder_records",
    "open_folder",
    "read_imagefolder",
    "relative_name",
    "sidecar_records",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Image files we do not train on still count as inputs, so they are quarantined with a
# reason (unsupported_format) instead of being skipped unseen.
INPUT_SUFFIXES = IMAGE_SUFFIXES | {".svg", ".heic", ".heif", ".avif", ".jxl", ".ico", ".psd", ".jp2"}
CAPTION_KEYS = ("text", "caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def relative_name(name: str) -> str:
    """The normalised relative path a metadata ``file_name`` points at, or ReadRefused
    (absolute_path, path_traversal) when it could name something outside the root."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        raise ReadRefused(
            "absolute_path",
            f"{printable(name)} is an absolute path; metadata names files relative to the source folder",
        )
    if ".." in name.replace("\\", "/").split("/"):
        raise ReadRefused(
            "path_traversal",
            f"{printable(name)} climbs out with '..'; metadata names files inside the source folder",
        )
    rel = posixpath.normpath(name)
    if rel in (".", ""):
        raise ReadRefused("bad_metadata", f"file_name {name!r} names the folder itself, not a file")
    return rel


class Folder(ABC):
    """Read access to one source folder; keys are ``/``-separated paths below its root."""

    uri: str
    max_bytes: int
    max_concurrency: int  # reads worth running at once: 1 for local disks

    @abstractmethod
    def files(self) -> Iterator[str | SourceRejection]:
        """Every file below the root, sorted; a name that cannot be stored comes as a rejection."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def lines(self, rel: str) -> Iterator[bytes]:
        """The lines of a small text file, ends kept, streamed."""

    @abstractmethod
    def read(self, rel: str) -> bytes:
        """The bytes of one file, or ReadRefused (missing_file, too_large, symlink_escape, ...)."""

    def metadata_names(self) -> list[str]:
        return [name for name in METADATA_FILES if self.exists(name)]

    def _too_large(self, rel: str, size: int) -> ReadRefused:
        return ReadRefused(
            "too_large",
            f"{printable(rel)} is {size} bytes, above "
            f"dataset.source.max_bytes={self.max_bytes}; it was not read",
        )


class LocalFolder(Folder):
    def __init__(self, root: Path, max_bytes: int) -> None:
        if not root.is_dir():
            raise FileNotFoundError(
                f"source folder {root} does not exist or is not a folder; check dataset.source.uri"
            )
        self.root = root
        self.real_root = os.path.realpath(root)
        self.uri = f"file://{root}"
        self.max_bytes = max_bytes
        self.max_concurrency = 1

    def files(self) -> Iterator[str | SourceRejection]:
        # Symlinked folders are not descended into: what they hold is either outside the
        # root or reachable by its real path already.
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            found.extend(f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames)
        for rel in sorted(found):
            if is_utf8(rel):
                yield rel
            else:
                yield SourceRejection(
                    printable(os.fsencode(rel).decode("utf-8", "backslashreplace")),
                    "bad_path_encoding",
                    "the file name is not UTF-8; rename it",
                )

    def _real(self, rel: str) -> str:
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.real_root and not real.startswith(self.real_root + os.sep):
            raise ReadRefused(
                "symlink_escape",
                f"{printable(rel)} is or passes a symlink leading "
                f"outside the source folder {self.root}; it was not read",
            )
        return real

    def exists(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.root, rel))

    def lines(self, rel: str) -> Iterator[bytes]:
        with open(self._real(rel), "rb") as fh:
            yield from fh

    def read(self, rel: str) -> bytes:
        real = self._real(rel)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise ReadRefused("missing_file", f"{printable(rel)} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise ReadRefused("not_a_file", f"{printable(rel)} is not a regular file")
        if st.st_size > self.max_bytes:
            raise self._too_large(rel, st.st_size)
        try:
            with open(real, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except OSError as err:
            raise ReadRefused("unreadable", f"{printable(rel)}: {err.strerror or err}") from None
        if len(data) > self.max_bytes:  # it grew since stat
            raise self._too_large(rel, len(data))
        return data


class S3Folder(Folder):
    """An ``s3://bucket/prefix`` read object by object; only the key names are listed."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, max_bytes: int) -> None:
        from sd_pipeline.storage import S3Store

        self.store = S3Store(bucket, prefix.strip("/"), endpoint_url=endpoint_url)
        self.uri = self.store.root_uri
        self.max_bytes = max_bytes
        self.max_concurrency = int(self.store.client.meta.config.max_pool_connections or 10)

    def files(self) -> Iterator[str | SourceRejection]:
        yield from (key for key in self.store.list("") if not key.endswith("/"))

    def exists(self, rel: str) -> bool:
        return self.store.exists(rel)

    def _get(self, rel: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._key(rel))
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ReadRefused("missing_file", f"{printable(rel)} does not exist in {self.uri}") from None
            raise ReadRefused("unreadable", f"{printable(rel)}: S3 said {code}: {err}") from None

    def lines(self, rel: str) -> Iterator[bytes]:
        body = self._get(rel)["Body"]
        pending = b""
        try:
            for chunk in body.iter_chunks(1 << 16):
                *complete, pending = (pending + chunk).split(b"\n")
                yield from (line + b"\n" for line in complete)
            if pending:
                yield pending
        finally:
            body.close()

    def read(self, rel: str) -> bytes:
        # Connection failures (after boto3's own retries) are not this object's fault: they
        # propagate and fail the ingest, whose task retry then reads everything again.
        response = self._get(rel)
        body = response["Body"]
        try:
            if response.get("ContentLength", 0) > self.max_bytes:
                raise self._too_large(rel, response["ContentLength"])
            data: bytes = body.read(self.max_bytes + 1)
        finally:
            body.close()
        if len(data) > self.max_bytes:
            raise self._too_large(rel, len(data))
        return data


def open_folder(uri: str, *, endpoint_url: str | None = None, max_bytes: int = 64 * 2**20) -> Folder:
    """The folder behind ``file:///abs/path``, ``/abs/path`` or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Folder(parsed.netloc, parsed.path, endpoint_url, max_bytes)
    if parsed.scheme in ("file", ""):
        return LocalFolder(Path(parsed.path), max_bytes)
    raise ValueError(f"source {uri!r}: use file:///abs/path or s3://bucket/prefix")


def _refusal(source: str, err: ReadRefused) -> SourceRejection:
    return SourceRejection(source, err.reason, err.detail)


# -- imagefolder ----------------------------------------------------------------------


def _metadata_rows(folder: Folder, name: str) -> Iterator[Row]:
    if name.endswith(".csv"):
        return csv_rows(folder.lines(name), name, required="file_name")
    return jsonl_rows(folder.lines(name), name)


def _read_listed(folder: Folder, rel: str, source: str, caption: str, extra: dict[str, Any]) -> Record:
    try:
        return SourceItem(source, folder.read(rel), caption, extra)
    except ReadRefused as err:
        return _refusal(source, err)


def read_imagefolder(root: Path) -> Iterator[Record]:
    """Every record of a local imagefolder, read in order (see ``imagefolder_records``)."""
    return resolve_in_order(imagefolder_records(LocalFolder(Path(root), 64 * 2**20)), workers=1)


def imagefolder_records(folder: Folder) -> Iterator[Record | Deferred]:
    """Records of an imagefolder: one per metadata row, then one per unlisted image file.

    Image bytes come as deferred reads, so a caller can fetch several at once.
    """
    names = folder.metadata_names()
    if not names:
        raise FileNotFoundError(
            f"{folder.uri} has no metadata.jsonl or metadata.csv; an imagefolder source needs one "
            "(a row per image with file_name and text), or set dataset.source.kind: sidecar for "
            "name.txt captions beside the images"
        )
    if len(names) > 1:
        raise ValueError(
            f"{folder.uri} has both {' and '.join(names)}; keep one so each image has exactly one caption"
        )
    meta = names[0]
    listed: set[str] = set()
    for where, row, problem in _metadata_rows(folder, meta):
        if problem is not None or row is None:
            yield problem or SourceRejection(where, "bad_metadata", f"{where} is not a metadata row")
            continue
        yield _listed_record(folder, where, row, listed)
    for rel in folder.files():
        if isinstance(rel, SourceRejection):
            yield rel
        elif _suffix(rel) in INPUT_SUFFIXES and rel not in listed:
            yield SourceRejection(rel, "unlisted_file", f"{rel} is not named in {meta}, so it has no caption")


def _listed_record(folder: Folder, where: str, row: dict[str, Any], listed: set[str]) -> Record | Deferred:
    name = row.get("file_name")
    if not isinstance(name, str) or not name:
        return SourceRejection(where, "bad_metadata", f"{where} has no file_name string")
    if not is_utf8(name):
        return SourceRejection(
            where, "bad_metadata_encoding", f"{where}: file_name {printable(name)} is not UTF-8"
        )
    try:
        rel = relative_name(name)
    except ReadRefused as err:
        return _refusal(name, err)
    if rel in listed:
        return SourceRejection(where, "duplicate_entry", f"{name} is listed again on {where}")
    listed.add(rel)
    caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
    if not isinstance(caption, str):
        return SourceRejection(name, "missing_caption", f"{name} has no text/caption string on {where}")
    if not is_utf8(caption):
        return SourceRejection(
            name,
            "bad_caption_encoding",
            f"the caption of {name} on {where} is not UTF-8; re-save the metadata as UTF-8",
        )
    extra = {k: carried(v) for k, v in row.items() if k not in ("file_name", *CAPTION_KEYS)}
    bad = [k for k, v in extra.items() if not is_utf8(k) or (isinstance(v, str) and not is_utf8(v))]
    if bad:
        return SourceRejection(
            name,
            "bad_metadata_encoding",
            f"column {printable(bad[0])!r} of {name} on {where} is not UTF-8; re-save the metadata as UTF-8",
        )
    return partial(_read_listed, folder, rel, name, caption, extra)


# -- sidecar captions (kohya) ---------------------------------------------------------


def _read_captioned(folder: Folder, rel: str, caption_rel: str) -> Record:
    try:
        raw = folder.read(caption_rel)
    except ReadRefused as err:
        return SourceRejection(rel, err.reason, f"caption file: {err.detail}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return SourceRejection(
            rel, "bad_caption_encoding", f"{caption_rel} is not UTF-8 (byte {err.start}); re-save it as UTF-8"
        )
    # kohya's sd-scripts read the first line of a caption file; so do we (docs/ingest.md).
    caption = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0] if text.strip() else text
    try:
        return SourceItem(rel, folder.read(rel), caption)
    except ReadRefused as err:
        return _refusal(rel, err)


def sidecar_records(folder: Folder, *, caption_extension: str = ".txt") -> Iterator[Record | Deferred]:
    """Records of a kohya-style folder: one per image file (its caption from the ``.txt``
    beside it), then one per caption file with no image beside it."""
    captions: set[str] = set()
    images: list[str] = []
    for rel in folder.files():
        if isinstance(rel, SourceRejection):
            yield rel
        elif rel.endswith(caption_extension):
            captions.add(rel)
        elif _suffix(rel) in INPUT_SUFFIXES:
            images.append(rel)
    used: set[str] = set()
    for rel in images:
        caption_rel = rel[: -len(PurePosixPath(rel).suffix)] + caption_extension
        used.add(caption_rel)
        if caption_rel in captions:
            yield partial(_read_captioned, folder, rel, caption_rel)
        else:
            yield SourceRejection(
                rel, "missing_caption", f"{rel} has no caption file {caption_rel} beside it"
            )
    for caption_rel in sorted(captions - used):
        yield SourceRejection(
            caption_rel,
            "orphan_caption",
            f"{caption_rel} has no image beside it (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
        )
