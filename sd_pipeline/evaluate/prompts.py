"""Versioned prompt sets: the fixed prompts every model of a pipeline is sampled with.

A set is a YAML file (``name``, ``version``, ``prompts``, optional ``description``); one
ships with the package (``default-v1``) and a config may point at its own. Evaluations
record the set's name, version and content digest, so two results are comparable only
when those match.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

SHIPPED = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    prompts: list[str]
    source: str
    description: str = ""
    sha256: str = field(default="")

    def describe(self) -> dict[str, Any]:
        """What an evaluation records about the set it used."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "source": self.source, "prompts": list(self.prompts)}


def shipped_prompt_sets() -> list[str]:
    folder = resources.files("sd_pipeline") / "resources" / "prompts"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_prompt_set(
    prompt_set: str, inline: list[str] | None = None, *, endpoint_url: str | None = None
) -> PromptSet:
    """The prompts to evaluate with: ``inline`` if given, else the set ``prompt_set`` names.

    ``prompt_set`` is a shipped set's name (``default-v1``) or a YAML file: a local path,
    ``file://`` or ``s3://`` URI.
    """
    if inline is not None:
        prompts = _check_prompts(inline, "evaluate.prompts")
        digest = _digest(prompts)
        return PromptSet(name="inline", version=digest[:12], prompts=prompts,
                         source="evaluate.prompts", sha256=digest)
    if SHIPPED.fullmatch(prompt_set):
        path = resources.files("sd_pipeline") / "resources" / "prompts" / f"{prompt_set}.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluate.prompt_set {prompt_set!r} is not a shipped prompt set "
                f"(shipped: {shipped_prompt_sets()}); name one of those or give a YAML file's path or URI"
            )
        return parse_prompt_set(path.read_text(encoding="utf-8"), source=f"shipped:{prompt_set}")
    return parse_prompt_set(_read(prompt_set, endpoint_url), source=prompt_set)


def parse_prompt_set(text: str, *, source: str) -> PromptSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"prompt set {source} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"prompt set {source} must be a mapping with name, version and prompts")
    missing = [k for k in ("name", "version", "prompts") if k not in data]
    if missing:
        raise ValueError(f"prompt set {source} lacks {missing}; a set needs name, version and prompts")
    unknown = sorted(set(data) - {"name", "version", "prompts", "description"})
    if unknown:
        raise ValueError(f"prompt set {source} has unknown keys {unknown}; "
                         "allowed: name, version, prompts, description")
    prompts = _check_prompts(data["prompts"], f"prompt set {source}")
    return PromptSet(
        name=str(data["name"]), version=str(data["version"]), prompts=prompts, source=source,
        description=str(data.get("description") or ""),
        sha256=_digest(prompts),
    )


def _check_prompts(prompts: Any, where: str) -> list[str]:
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{where}: prompts must be a non-empty list of strings")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{where}: prompts must be non-empty strings; got {bad[:3]!r}")
    return [p.strip() for p in prompts]


def _digest(prompts: list[str]) -> str:
    """Content hash of the prompts alone: comments or a description do not change results."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def _read(uri: str, endpoint_url: str | None) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from sd_pipeline.storage import Store

        store = Store.from_uri(f"s3://{parsed.netloc}", endpoint_url)
        return store.get_bytes(parsed.path.lstrip("/")).decode("utf-8")
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"prompt set {uri!r}: use a shipped name, a path, file:// or s3:// URI")
    path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt set file {str(path)!r} does not exist (evaluate.prompt_set)")
    return path.read_text(encoding="utf-8")
