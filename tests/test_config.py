"""The pipeline config: defaults, overrides, and errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_pipeline.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_demo_config_loads_and_expands_the_home(home: Path) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.storage.root == f"file://{home}/store"
    assert cfg.model.base == f"{home}/models/tiny-sd"
    assert (cfg.train.method, cfg.train.steps) == ("full", 200)  # as configs/demo.yaml says


def test_defaults_also_expand_the_home(home: Path) -> None:
    cfg = parse_config({})
    assert cfg.dataset.source.uri == f"file://{home}/raw/shapes"
    assert "${" not in cfg.to_json()


def test_dotted_overrides_apply_and_are_validated(home: Path) -> None:
    cfg = parse_config({}, {"train.steps": 7, "train.method": "full"})
    assert (cfg.train.steps, cfg.train.method) == (7, "full")
    with pytest.raises(ConfigError, match=r"train\.steps: .*greater than or equal to 1.*got 0"):
        parse_config({}, {"train.steps": 0})


def test_unknown_key_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        parse_config({"train": {"stepz": 3}})


def test_bad_enum_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"method": "dreambooth"}})
    assert "train.method" in str(err.value)
    assert "'lora' or 'full'" in str(err.value)
    assert "dreambooth" in str(err.value)


def test_bad_storage_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="must start with file:// or s3://"):
        parse_config({"storage": {"root": "gs://bucket"}})


def test_missing_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\$\{NOPE_NOT_SET\}"):
        parse_config({"storage": {"root": "s3://${NOPE_NOT_SET}/x"}}, env={})


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(p)


def test_fingerprint_follows_content(home: Path) -> None:
    a, b = parse_config({}), parse_config({})
    assert a.fingerprint() == b.fingerprint()
    assert parse_config({}, {"train.seed": 1}).fingerprint() != a.fingerprint()


def test_config_reference_doc_is_current() -> None:
    from sd_pipeline.config import reference_markdown

    doc = (REPO / "docs" / "config.md").read_text()
    assert doc.strip() == reference_markdown().strip(), (
        "docs/config.md is stale: run `python -m sd_pipeline.config > docs/config.md`"
    )
