"""Strict validation of Kubernetes objects against the ``kubernetes`` client's OpenAPI models.

``ApiClient.deserialize`` silently drops fields it does not know; a misspelt ``tolerations``
would pass. This walks the models' ``openapi_types``/``attribute_map`` instead and fails on
any unknown field, wrong type, missing required field or bad enum value, naming its path.
"""

from __future__ import annotations

import re
from typing import Any

from kubernetes import client as k8s


class InvalidObject(ValueError):
    """The object does not fit the Kubernetes model; the message names the field path."""


def model_name(api_version: str, kind: str) -> str:
    """``("rbac.authorization.k8s.io/v1", "Role")`` -> ``"V1Role"``."""
    version = api_version.rsplit("/", 1)[-1]
    return f"{version[0].upper()}{version[1:]}{kind}"


def validate_manifest(obj: dict[str, Any], where: str = "") -> Any:
    """Validate one manifest (apiVersion + kind + ...) and return the model instance."""
    for key in ("apiVersion", "kind"):
        if key not in obj:
            raise InvalidObject(f"{where}: no {key}")
    return validate(obj, model_name(obj["apiVersion"], obj["kind"]), where or obj["kind"])


def validate(data: Any, type_name: str, path: str = "$") -> Any:
    """Deserialize ``data`` as ``type_name`` (a model name or an OpenAPI type string), strictly."""
    if type_name.startswith("list["):
        if not isinstance(data, list):
            raise InvalidObject(f"{path}: expected a list, got {type(data).__name__}")
        inner = type_name[5:-1]
        return [validate(v, inner, f"{path}[{i}]") for i, v in enumerate(data)]
    mapping = re.fullmatch(r"dict[\[(]str, (.*)[\])]", type_name)
    if mapping:
        if not isinstance(data, dict):
            raise InvalidObject(f"{path}: expected a mapping, got {type(data).__name__}")
        return {k: validate(v, mapping.group(1), f"{path}.{k}") for k, v in data.items()}
    if type_name == "object":
        return data
    primitive = {"str": str, "int": int, "float": (int, float), "bool": bool,
                 "datetime": str, "date": str}.get(type_name)
    if primitive is not None:
        if not isinstance(data, primitive) or (type_name in ("int", "float") and isinstance(data, bool)):
            raise InvalidObject(f"{path}: expected {type_name}, got {data!r}")
        return data
    klass = getattr(k8s, type_name, None)
    if klass is None:
        raise InvalidObject(f"{path}: the kubernetes client has no model {type_name}")
    if not isinstance(data, dict):
        raise InvalidObject(f"{path}: expected a {type_name} mapping, got {type(data).__name__}")
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise InvalidObject(f"{path}: unknown field(s) {unknown} for {type_name}")
    kwargs = {by_json[k]: validate(v, klass.openapi_types[by_json[k]], f"{path}.{k}")
              for k, v in data.items()}
    try:
        return klass(**kwargs)  # client-side validation: required fields, enums
    except (ValueError, TypeError) as err:
        raise InvalidObject(f"{path}: {err}") from None
