"""An s3:// base model is copied into the local cache: no object key may place a file outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sd_pipeline.models.base import resolve_base_model
from sd_pipeline.storage import StoreError


@pytest.mark.parametrize(
    "hostile", ["models/base/../../../../escaped", "models/base/{abs}"], ids=["dot-dot", "leading-slash"]
)
def test_a_base_model_key_that_climbs_out_of_the_cache_is_refused_by_name(
    bucket: str, s3_env: str, tmp_path: Path, hostile: str
) -> None:
    import boto3

    outside = tmp_path / "escaped"
    key = hostile.format(abs=outside)  # "models/base//<tmp>/escaped": absolute once the prefix is cut
    client = boto3.client("s3", endpoint_url=s3_env)
    client.put_object(Bucket=bucket, Key="models/base/model_index.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"pwned")
    cache = tmp_path / "c1" / "c2" / "cache"
    with pytest.raises(StoreError, match=re.escape(repr(key))):
        resolve_base_model(f"s3://{bucket}/models/base", cache)
    assert not outside.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing cached, nothing half-copied
