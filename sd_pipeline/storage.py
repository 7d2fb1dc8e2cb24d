"""Store: one object-store root URI (``file://`` or ``s3://``) with atomic publish.

Code never cares which backend it talks to. Every single object write is atomic (a temp
file renamed into place; an S3 PUT). A multi-object result (a dataset version, a
checkpoint, a model) is published by writing its ``_COMMITTED`` marker last; readers
trust only committed prefixes, so nobody ever sees half of one.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

COMMITTED = "_COMMITTED"


class StoreError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def local_target(folder: Path, relative: str, key: str) -> Path:
    """Where object ``key`` (``relative`` to the copied prefix) goes below ``folder``.

    Object keys are data, not paths: one with ``..`` parts or a leading ``/`` would otherwise
    write anywhere the worker may, so anything that resolves outside ``folder`` is refused.
    """
    root = Path(folder).resolve()
    target = (root / relative).resolve()
    if root not in target.parents:
        raise StoreError(
            f"object key {key!r} would be written to {target}, outside {root}; keys with '..' parts "
            "or a leading '/' are refused: rename or delete that object"
        )
    return target


class Store(ABC):
    """Keys are ``/``-separated paths relative to the root URI."""

    root_uri: str

    @staticmethod
    def from_uri(root: str, endpoint_url: str | None = None) -> Store:
        parsed = urlparse(root)
        if parsed.scheme == "file":
            return LocalStore(Path(parsed.path))
        if parsed.scheme == "s3":
            return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
        raise StoreError(f"unsupported store URI {root!r}: use file:///abs/path or s3://bucket/prefix")

    def uri(self, key: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{key.lstrip('/')}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""

    # -- conveniences shared by both backends ------------------------------------

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(self.get_bytes(key))
        os.replace(tmp, path)
        return path

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[str]:
        """Upload every file below ``local_dir`` under ``prefix``; returns the keys."""
        keys = []
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
                self.put_file(key, path)
                keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: Path) -> Path:
        """Copy every object under ``prefix`` below ``local_dir``; a key that would land outside
        it is refused before anything is written."""
        prefix = prefix.rstrip("/") + "/"
        targets = [(key, local_target(local_dir, key[len(prefix) :], key)) for key in self.list(prefix)]
        for key, path in targets:
            self.get_file(key, path)
        return Path(local_dir)

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Move one object (a rename locally, a server-side copy then delete on S3)."""

    # -- publish protocol -------------------------------------------------------

    def is_committed(self, prefix: str) -> bool:
        return self.exists(f"{prefix.rstrip('/')}/{COMMITTED}")

    def commit(self, prefix: str, info: dict[str, Any] | None = None) -> None:
        """Publish everything under ``prefix`` by writing its marker last."""
        self.put_json(f"{prefix.rstrip('/')}/{COMMITTED}", info or {})

    def write_pointer(self, key: str, value: str) -> None:
        self.put_bytes(key, value.encode())

    def read_pointer(self, key: str) -> str | None:
        return self.get_bytes(key).decode().strip() if self.exists(key) else None

    def iter_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        for key in self.list(prefix):
            yield key, self.get_bytes(key)


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise StoreError(f"file:// store root must be absolute, got {str(root)!r}")
        self.root = root
        self.root_uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if path != self.root.resolve() and self.root.resolve() not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root_uri}")
        return path

    def local_path(self, key: str) -> Path:
        """The file behind a key (local stores only): lets big readers avoid a copy."""
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.uri(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        root = self.root.resolve()
        return sorted(
            p.relative_to(root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix)
        if base.is_file():
            base.unlink()
            return 1
        if not base.is_dir():
            return 0
        n = sum(1 for p in base.rglob("*") if p.is_file())
        shutil.rmtree(base)
        return n


class S3Store(Store):
    """boto3 against AWS, MinIO or any S3 API; credentials come from the usual AWS chain."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        import boto3  # heavy: only when an s3:// root is used
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.root_uri = f"s3://{bucket}/{prefix}".rstrip("/")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 8, "mode": "adaptive"}),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key.lstrip('/')}" if self.prefix else key.lstrip("/")

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def move(self, src: str, dst: str) -> None:
        self.client.copy_object(
            Bucket=self.bucket, Key=self._key(dst), CopySource={"Bucket": self.bucket, "Key": self._key(src)}
        )
        self.client.delete_object(Bucket=self.bucket, Key=self._key(src))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StoreError(f"{self.uri(key)} does not exist") from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []))
        # A prefix "a/b" must not match "a/bc/...": keep exact key or children only.
        want = prefix.rstrip("/")
        return sorted(k for k in keys if k == want or k.startswith(want + "/") or not want)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in keys[i : i + 1000]]},
            )
        return len(keys)
