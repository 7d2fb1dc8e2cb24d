"""Base models: tiny SD and SDXL are deterministic and work offline; any model resolves, loads, hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_pipeline.models.base import (  # noqa: E402
    DIGEST_SIDECAR,
    load_components,
    model_digest,
    resolve_base_model,
)
from sd_pipeline.models.tiny import MARKER, build_tiny_model, build_tiny_sd, build_tiny_sdxl  # noqa: E402
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


def test_digest_is_cached_beside_the_model_and_only_changed_files_are_read(
    tiny: Path, tmp_path: Path
) -> None:
    import json
    import os
    import shutil

    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    first = model_digest(copy)
    sidecar = json.loads((copy / DIGEST_SIDECAR).read_text())
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert sidecar["files"][unet]["size"] == (copy / unet).stat().st_size
    assert DIGEST_SIDECAR not in sidecar["files"]  # hidden: outside its own digest

    # Same size and mtime: the cached hash is trusted and the file is not read again, so
    # even a same-length overwrite goes unseen (the documented limit of the cache).
    scheduler = copy / "scheduler" / "scheduler_config.json"
    stat = scheduler.stat()
    text = scheduler.read_text()
    scheduler.write_text(text.replace("1000", "0999"))
    os.utime(scheduler, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert scheduler.stat().st_size == stat.st_size
    assert model_digest(copy) == first

    # A real edit moves the mtime: that file is hashed again and the digest changes.
    scheduler.write_text(text.replace("1000", "999"))
    changed = model_digest(copy)
    assert changed != first
    assert json.loads((copy / DIGEST_SIDECAR).read_text())["files"][unet] == sidecar["files"][unet]

    # Without the sidecar everything is read: the same folder gives the same digest.
    (copy / DIGEST_SIDECAR).unlink()
    assert model_digest(copy) == changed
    (copy / "extra.txt").write_text("new file")
    assert model_digest(copy) != changed
    (copy / "extra.txt").unlink()
    assert model_digest(copy) == changed
    assert not [p for p in copy.iterdir() if p.name.startswith(f"{DIGEST_SIDECAR}.")]  # no temp left


def test_digest_works_where_the_sidecar_cannot_be_written(tiny: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny, tmp_path / "ro"))
    (copy / DIGEST_SIDECAR).unlink(missing_ok=True)
    (copy / DIGEST_SIDECAR).mkdir()  # unwritable as a file even for root, unlike a chmod
    assert model_digest(copy) == model_digest(tiny)
    assert (copy / DIGEST_SIDECAR).is_dir()
    assert not [p for p in copy.iterdir() if p.name.startswith(f"{DIGEST_SIDECAR}.")]  # no temp left


# -- tiny SDXL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-xl") / "tiny-sdxl", CAPTIONS, seed=0)


def test_tiny_sdxl_rebuilds_byte_identical_in_sdxl_layout(tiny_xl: Path, tmp_path: Path) -> None:
    import json

    again = build_tiny_sdxl(tmp_path / "again", list(reversed(CAPTIONS)), seed=0)
    hashes = file_hashes(tiny_xl)
    assert hashes == file_hashes(again)
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json",
            "unet/diffusion_pytorch_model.safetensors"} <= hashes.keys()
    index = json.loads((tiny_xl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((tiny_xl / MARKER).read_text())["kind"] == "tiny-stable-diffusion-xl"
    assert build_tiny_model(tmp_path / "again", CAPTIONS, kind="sdxl") == again  # up to date: kept
    assert file_hashes(again) == hashes


def test_tiny_sdxl_shapes_fit_together(tiny_xl: Path) -> None:
    parts = load_components(tiny_xl, dtype=torch.float32)
    assert parts.is_sdxl and parts.tokenizer_2 is not None and parts.text_encoder_2 is not None
    te1, te2, unet = parts.text_encoder.config, parts.text_encoder_2.config, parts.unet.config
    assert te1.hidden_size != te2.hidden_size  # a concatenation in the wrong order cannot pass
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert parts.vae.config.block_out_channels == [16, 32, 32, 32]  # 8x down
    # Both tokenizers learned the caption words; the second pads like SDXL's OpenCLIP one.
    for tok in (parts.tokenizer, parts.tokenizer_2):
        words = tok.convert_ids_to_tokens(tok("a red circle").input_ids)[1:-1]
        assert words == ["a</w>", "red</w>", "circle</w>"]
    assert parts.tokenizer.pad_token == "<|endoftext|>" and parts.tokenizer_2.pad_token == "!"
    assert te2.pad_token_id == parts.tokenizer_2.pad_token_id

    parts.freeze(torch.device("cpu"))
    assert not any(p.requires_grad for p in parts.text_encoder_2.parameters())
    assert not parts.text_encoder_2.training


def test_sd_and_sdxl_kinds_replace_each_other_but_not_foreign_folders(tmp_path: Path) -> None:
    import json

    folder = build_tiny_model(tmp_path / "m", CAPTIONS[:4], kind="sd")
    build_tiny_model(folder, CAPTIONS[:4], kind="sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    build_tiny_sd(folder, CAPTIONS[:4])
    assert not (folder / "text_encoder_2").exists()
    with pytest.raises(ValueError, match=r"kind 'sd3' is unknown; use one of \['sd', 'sdxl'\]"):
        build_tiny_model(tmp_path / "x", CAPTIONS, kind="sd3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by build_tiny_sdxl"):
        build_tiny_sdxl(tmp_path / "mine", CAPTIONS)


def test_a_pipeline_that_is_not_sd_or_sdxl_is_refused_by_name(tiny_xl: Path, tmp_path: Path) -> None:
    import json
    import shutil

    refiner = Path(shutil.copytree(tiny_xl, tmp_path / "refiner"))
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", tokenizer=[None, None],
                 text_encoder=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"XLImg2ImgPipeline\) has no tokenizer, text_encoder; .* SDXL base"):
        load_components(refiner)
