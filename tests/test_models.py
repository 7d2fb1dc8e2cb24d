"""Base models: the tiny SD is deterministic and usable offline; any model resolves, loads, hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_pipeline.models.base import (  # noqa: E402
    load_components,
    model_digest,
    resolve_base_model,
)
from sd_pipeline.models.tiny import MARKER, build_tiny_sd  # noqa: E402
from sd_pipeline.storage import Store  # noqa: E402

CAPTIONS = [
    f"a {fg} {shape} on a {bg} background"
    for shape in ("circle", "square", "triangle")
    for fg in ("red", "green", "blue")
    for bg in ("white", "black")
]


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd", CAPTIONS, seed=0)


def test_same_captions_and_seed_give_identical_files(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_sd(tmp_path / "again", list(reversed(CAPTIONS)), seed=0)
    hashes = file_hashes(tiny)
    assert hashes == file_hashes(again)
    assert {"model_index.json", MARKER, "unet/diffusion_pytorch_model.safetensors",
            "tokenizer/tokenizer.json"} <= hashes.keys()


def test_it_samples_a_64px_image_offline(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    image = pipe(
        "a red circle on a white background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_tokenizer_learns_the_caption_words(tiny: Path) -> None:
    parts = load_components(tiny)
    tok = parts.tokenizer
    assert tok.model_max_length == parts.text_encoder.config.max_position_embeddings == 32
    ids = tok("A Red  circle on a WHITE background").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>",
                      "white</w>", "background</w>", "<|endoftext|>"]
    assert parts.text_encoder.config.eos_token_id == tok.eos_token_id
    # An unseen word still encodes, byte by byte.
    assert tok.decode(tok("a purple hexagon").input_ids, skip_special_tokens=True) == (
        "a purple hexagon"
    )


def test_rebuilding_is_skipped_or_redone_as_the_inputs_say(tmp_path: Path) -> None:
    folder = build_tiny_sd(tmp_path / "m", CAPTIONS[:4], seed=0)
    marker_time = (folder / MARKER).stat().st_mtime_ns
    unet = folder / "unet/diffusion_pytorch_model.safetensors"
    first = unet.read_bytes()

    assert build_tiny_sd(folder, CAPTIONS[:4], seed=0) == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker_time  # untouched

    build_tiny_sd(folder, CAPTIONS[:4], seed=1)
    assert unet.read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_foreign_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by build_tiny_sd"):
        build_tiny_sd(tmp_path / "mine", CAPTIONS, seed=0)
    with pytest.raises(ValueError, match="captions is empty"):
        build_tiny_sd(tmp_path / "empty", [], seed=0)


def test_local_base_resolves_as_is_and_loads(tiny: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny), tmp_path) == tiny
    assert resolve_base_model(f"file://{tiny}", tmp_path) == tiny
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_base_model(str(tmp_path / "nothing"), tmp_path)

    parts = load_components(tiny, dtype=torch.float32)
    assert type(parts.unet).__name__ == "UNet2DConditionModel"
    assert parts.noise_scheduler.config.prediction_type == "epsilon"
    assert parts.vae.config.block_out_channels == [16, 32, 32, 32]  # 8x down, as in SD


def test_s3_base_is_cached_once_and_hashes_like_its_source(
    tiny: Path, tmp_path: Path, bucket: str
) -> None:
    Store.from_uri(f"s3://{bucket}").upload_dir(tiny, "models/tiny-sd")
    uri = f"s3://{bucket}/models/tiny-sd"

    local = resolve_base_model(uri, tmp_path / "cache")
    assert local.parent == tmp_path / "cache"
    assert model_digest(local) == model_digest(tiny)

    Store.from_uri(f"s3://{bucket}").delete_prefix("models")
    assert resolve_base_model(uri, tmp_path / "cache") == local  # served from the cache

    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_base_model(f"s3://{bucket}/models/missing", tmp_path / "cache")


def test_digest_changes_with_any_file(tiny: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    assert model_digest(copy) == model_digest(tiny)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert model_digest(copy) != model_digest(tiny)
