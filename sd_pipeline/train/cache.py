"""The latent cache: VAE latents and text embeddings of dataset versions, computed once, in the store.

Training a UNet never needs pixels or caption strings, only what the frozen VAE encoder and
text encoders make of them. Those are computed once per fingerprint of everything that
shapes them (dataset versions, base model digest, resolution, bucket config) and written to
``cache/<dataset>/<fingerprint>/`` as safetensors shards, ``_COMMITTED`` last:

- ``captions.safetensors``: one embedding per distinct caption (``hidden``, SDXL's ``pooled``)
  and the empty caption's (for caption dropout); ``captions.json`` lists the captions.
- ``<split>/<H>x<W>-<n>.safetensors``: per bucket, the latent distribution of each image
  (``mean``, ``std``: a fresh latent is drawn from it every step, as the VAE would), the
  row of its caption, its original size and crop (SDXL's micro-conditioning).

Later runs (other learning rates, methods, steps) read the shards and load neither the VAE
nor a text encoder. The build streams: memory holds one shard per bucket, not the dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline.ingest.shards import ShardSample
from sd_pipeline.ingest.versions import iter_samples_many
from sd_pipeline.train.buckets import Bucket, cover_and_crop, make_buckets, nearest_bucket

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sd_pipeline.config import PipelineConfig
    from sd_pipeline.models.base import SDComponents
    from sd_pipeline.storage import Store

log = logging.getLogger("sd_pipeline.cache")

CACHE_FORMAT = 1
SHARD_SAMPLES = 1024  # images per cache shard file
ENCODE_BATCH = 16
SPLITS = ("train", "holdout")


class EmptySplitError(ValueError):
    """The split to train or evaluate on holds no samples."""


def cache_fingerprint(config: PipelineConfig, versions: list[str], base_digest: str) -> str:
    """Hash of everything that shapes the cached tensors (and nothing that does not)."""
    payload = {
        "format": CACHE_FORMAT,
        "dataset": config.dataset.name,
        "versions": list(versions),
        "base_model_sha256": base_digest,
        "resolution": config.dataset.resolution,
        "buckets": [b.name for b in buckets_for(config)],
        "text_cached": not config.train.train_text_encoder,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def buckets_for(config: PipelineConfig) -> list[Bucket]:
    tc = config.train
    return make_buckets(config.dataset.resolution, tc.bucket_step, tc.bucket_max_aspect, tc.buckets)


def cache_prefix(dataset: str, fingerprint: str) -> str:
    return f"cache/{dataset}/{fingerprint}"


# -- reading ------------------------------------------------------------------------------


class ShardedRows:
    """One field's rows over a bucket's shard files, memory-mapped.

    The shards are opened with ``safetensors.torch.load_file``, whose tensors are views of
    the mapped file: nothing is read until a batch asks for its rows, and what was read is
    page cache the kernel can drop. Host memory therefore stays flat as the dataset grows
    (the old reader held every latent in RAM: ~13 GB per 100k images at 512 px).
    """

    def __init__(self, parts: list[torch.Tensor]) -> None:
        import torch

        if not parts:
            raise ValueError("ShardedRows needs at least one shard")
        self.parts = parts
        sizes = torch.tensor([len(p) for p in parts])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def __getitem__(self, index: Any) -> torch.Tensor:
        """Rows by a 1-D index tensor or list (in that order), or a slice."""
        import torch

        if isinstance(index, slice):
            return torch.cat(self.parts)[index] if len(self.parts) > 1 else self.parts[0][index]
        idx = torch.as_tensor(index, dtype=torch.long)
        if len(self.parts) == 1:
            return self.parts[0][idx]
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        local = idx - self.starts[shard]
        out = torch.empty((len(idx), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype)
        for s in shard.unique().tolist():
            picked = shard == s
            out[picked] = self.parts[s][local[picked]]
        return out


@dataclass
class BucketData:
    bucket: Bucket
    keys: list[str]
    mean: ShardedRows  # [n, C, h, w] unscaled VAE latents, memory-mapped
    std: ShardedRows
    caption_index: torch.Tensor  # [n] -> row of Captions.hidden
    original_size: torch.Tensor  # [n, 2] (height, width) of the image before the bucket resize
    crop_top_left: torch.Tensor  # [n, 2]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Captions:
    texts: list[str]
    hidden: torch.Tensor  # [K, T, D]
    pooled: torch.Tensor | None  # [K, P] for SDXL
    empty_hidden: torch.Tensor  # [T, D]
    empty_pooled: torch.Tensor | None


@dataclass
class LatentCache:
    fingerprint: str
    uri: str
    index: dict[str, Any]
    captions: Captions
    splits: dict[str, list[BucketData]] = field(default_factory=dict)

    def split(self, name: str) -> list[BucketData]:
        data = [b for b in self.splits.get(name, []) if len(b)]
        if not data:
            raise EmptySplitError(
                f"the cached dataset ({', '.join(self.index['versions'])}) has no samples with split "
                f"{name!r}; check dataset.holdout_fraction and the ingest output"
            )
        return data


def load_cache(store: Store, prefix: str, splits: Iterable[str] = SPLITS) -> LatentCache:
    """Open a committed cache: captions in memory, latents memory-mapped (``ShardedRows``)."""
    import torch
    from safetensors.torch import load_file

    index = store.get_json(f"{prefix}/index.json")
    folder = _local_folder(store, prefix, index)
    raw = load_file(folder / "captions.safetensors")
    texts = json.loads((folder / "captions.json").read_text())
    captions = Captions(
        texts=texts,
        hidden=raw["hidden"],
        pooled=raw.get("pooled"),
        empty_hidden=raw["empty_hidden"][0],
        empty_pooled=raw["empty_pooled"][0] if "empty_pooled" in raw else None,
    )
    cache = LatentCache(index["fingerprint"], store.uri(prefix), index, captions)
    for split in splits:
        buckets = []
        for name, entry in sorted(index["splits"].get(split, {}).items()):
            if not entry["shards"]:
                continue
            parts = [load_file(folder / split / shard) for shard in entry["shards"]]
            small = ("caption_index", "original_size", "crop_top_left")
            buckets.append(
                BucketData(
                    bucket=Bucket.parse(name),
                    keys=[k for shard in entry["keys"] for k in shard],
                    mean=ShardedRows([p["mean"] for p in parts]),
                    std=ShardedRows([p["std"] for p in parts]),
                    **{f: torch.cat([p[f] for p in parts]) for f in small},
                )
            )
        cache.splits[split] = buckets
    return cache


def _local_folder(store: Store, prefix: str, index: dict[str, Any]) -> Path:
    """The cache's files on local disk: in place for a local store, else downloaded once.

    A downloaded copy lives under ``<SD_PIPELINE_HOME>/work/latents/<fingerprint>-<built_at>``
    (a rebuilt cache has the same fingerprint but another build time) and is complete only
    when its ``.complete`` marker exists, so a download cut short is redone.
    """
    from sd_pipeline.models.base import default_cache_dir
    from sd_pipeline.storage import LocalStore

    if isinstance(store, LocalStore):
        return store.local_path(prefix)
    stamp = "".join(c if c.isalnum() else "-" for c in str(index.get("built_at", "")))
    folder = default_cache_dir().parent / "latents" / f"{index['fingerprint']}-{stamp}"
    if not (folder / ".complete").is_file():
        log.info("latent cache %s: copying %s to %s", index["fingerprint"], store.uri(prefix), folder)
        store.download_dir(prefix, folder)
        (folder / ".complete").write_text(store.uri(prefix) + "\n")
    return folder


# -- building -----------------------------------------------------------------------------


def decode_to_bucket(jpeg: bytes, buckets: list[Bucket], key: str = "?") -> tuple[Bucket, np.ndarray, tuple]:
    """JPEG -> (bucket, float32 CHW pixels in [-1, 1], ((orig h, w), (crop top, left)))."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB")
    except Exception as err:
        raise ValueError(f"sample {key!r}: image does not decode ({err})") from None
    w, h = rgb.size
    bucket = nearest_bucket(buckets, w, h)
    (rw, rh), (top, left) = cover_and_crop(w, h, bucket)
    if (rw, rh) != (w, h):
        rgb = rgb.resize((rw, rh), Image.Resampling.BICUBIC)
    rgb = rgb.crop((left, top, left + bucket.width, top + bucket.height))
    pixels = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return bucket, pixels.transpose(2, 0, 1).copy(), ((h, w), (top, left))


class _BucketWriter:
    """Encodes one (split, bucket)'s images in batches and writes shards of SHARD_SAMPLES."""

    def __init__(self, split: str, bucket: Bucket, vae: Any, out: Path) -> None:
        self.split, self.bucket, self.vae, self.out = split, bucket, vae, out
        self.pending: list[tuple[str, np.ndarray, int, tuple]] = []
        self.rows: dict[str, list] = {f: [] for f in ("keys", "mean", "std", "caption_index", "size", "crop")}
        self.shards: list[str] = []
        self.shard_keys: list[list[str]] = []
        self.count = 0

    def add(self, key: str, pixels: np.ndarray, caption_row: int, geometry: tuple) -> None:
        self.pending.append((key, pixels, caption_row, geometry))
        if len(self.pending) == ENCODE_BATCH:
            self._encode()

    def _encode(self) -> None:
        import numpy as np
        import torch

        if not self.pending:
            return
        pixels = torch.from_numpy(np.stack([p for _, p, _, _ in self.pending]))
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        self.rows["mean"].append(dist.mean.float().cpu())
        self.rows["std"].append(dist.std.float().cpu())
        for key, _, row, (size, crop) in self.pending:
            self.rows["keys"].append(key)
            self.rows["caption_index"].append(row)
            self.rows["size"].append(size)
            self.rows["crop"].append(crop)
        self.count += len(self.pending)
        self.pending.clear()
        if len(self.rows["keys"]) >= SHARD_SAMPLES:
            self._write()

    def _write(self) -> None:
        import torch
        from safetensors.torch import save_file

        if not self.rows["keys"]:
            return
        name = f"{self.bucket.name}-{len(self.shards):05d}.safetensors"
        (self.out / self.split).mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "mean": torch.cat(self.rows["mean"]).contiguous(),
                "std": torch.cat(self.rows["std"]).contiguous(),
                "caption_index": torch.tensor(self.rows["caption_index"], dtype=torch.long),
                "original_size": torch.tensor(self.rows["size"], dtype=torch.long),
                "crop_top_left": torch.tensor(self.rows["crop"], dtype=torch.long),
            },
            self.out / self.split / name,
        )
        self.shards.append(name)
        self.shard_keys.append(list(self.rows["keys"]))
        for rows in self.rows.values():
            rows.clear()

    def finish(self) -> dict[str, Any]:
        self._encode()
        self._write()
        return {"samples": self.count, "shards": self.shards, "keys": self.shard_keys}


def build_cache(
    samples: Iterable[ShardSample],
    parts: SDComponents,
    buckets: list[Bucket],
    out: Path,
    *,
    cache_text: bool = True,
) -> dict[str, Any]:
    """Encode ``samples`` into cache files under ``out``; returns the index (without identity)."""
    from safetensors.torch import save_file

    from sd_pipeline.models.conditioning import encode_prompts

    writers: dict[tuple[str, Bucket], _BucketWriter] = {}
    caption_rows: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for sample in samples:
        split = str(sample.meta.get("split", "train"))
        if split not in SPLITS:
            skipped[split] = skipped.get(split, 0) + 1
            continue
        bucket, pixels, geometry = decode_to_bucket(sample.image, buckets, sample.key)
        writer = writers.get((split, bucket))
        if writer is None:
            writer = writers[(split, bucket)] = _BucketWriter(split, bucket, parts.vae, out)
        row = caption_rows.setdefault(sample.caption, len(caption_rows))
        writer.add(sample.key, pixels, row, geometry)
    if not writers:
        raise EmptySplitError("the dataset versions hold no samples to cache")
    splits: dict[str, dict[str, Any]] = {}
    for (split, bucket), writer in sorted(writers.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        splits.setdefault(split, {})[bucket.name] = writer.finish()

    texts = list(caption_rows)  # insertion order = row order
    tensors: dict[str, torch.Tensor] = {}
    if cache_text:
        cond = encode_prompts(parts, texts)
        empty = encode_prompts(parts, [""])
        tensors = {"hidden": cond.hidden, "empty_hidden": empty.hidden}
        if cond.pooled is not None and empty.pooled is not None:
            tensors |= {"pooled": cond.pooled, "empty_pooled": empty.pooled}
    else:  # the text encoder trains: captions are encoded every step
        import torch

        tensors = {"hidden": torch.zeros(len(texts), 0, 0), "empty_hidden": torch.zeros(1, 0, 0)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "captions.safetensors")
    (out / "captions.json").write_text(json.dumps(texts))
    return {
        "splits": splits,
        "captions": len(texts),
        "text_cached": cache_text,
        "skipped_splits": skipped,
        "buckets": {
            split: {name: entry["samples"] for name, entry in entries.items()}
            for split, entries in splits.items()
        },
    }


def ensure_cache(
    config: PipelineConfig,
    store: Store,
    versions: list[str],
    base_path: Path,
    *,
    parts: SDComponents | None = None,
    splits: Iterable[str] = SPLITS,
    rebuild: bool = False,
) -> tuple[LatentCache, dict[str, Any]]:
    """Load the cache of (versions, base model, resolution, buckets); build it on a miss.

    Returns the cache and a summary: ``fingerprint, uri, hit, seconds, samples, buckets``.
    ``parts`` are loaded encoders to build with (loaded here on a miss when not given).
    """
    from sd_pipeline.models.base import model_digest

    fingerprint = cache_fingerprint(config, versions, model_digest(base_path))
    prefix = cache_prefix(config.dataset.name, fingerprint)
    hit = store.is_committed(prefix) and not rebuild
    t0 = time.perf_counter()
    if not hit:
        if parts is None:
            import torch

            from sd_pipeline.models.base import load_components

            parts = load_components(base_path, dtype=torch.float32)
            parts.freeze(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        log.info("latent cache %s: building for %s/%s", fingerprint, config.dataset.name, ",".join(versions))
        store.delete_prefix(prefix)  # leftovers of a crashed build, or a forced rebuild
        with tempfile.TemporaryDirectory(prefix="sd-cache-") as tmp:
            index = build_cache(
                iter_samples_many(store, config.dataset.name, versions),
                parts,
                buckets_for(config),
                Path(tmp),
                cache_text=not config.train.train_text_encoder,
            )
            index |= {
                "fingerprint": fingerprint,
                "dataset": config.dataset.name,
                "versions": list(versions),
                "base_model": str(base_path),
                "resolution": config.dataset.resolution,
                "seconds": round(time.perf_counter() - t0, 3),
                "built_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            }
            (Path(tmp) / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            store.upload_dir(Path(tmp), prefix)
        store.commit(prefix, {"fingerprint": fingerprint})
    cache = load_cache(store, prefix, splits)
    if cache.index.get("text_cached", True) != (not config.train.train_text_encoder):
        raise ValueError(
            f"latent cache {cache.uri} was built with text_cached={cache.index.get('text_cached')}; "
            "rebuild it (sd-pipeline cache --rebuild)"
        )
    summary = {
        "fingerprint": fingerprint,
        "uri": store.uri(prefix),
        "hit": hit,
        "seconds": round(time.perf_counter() - t0, 3),
        "build_seconds": cache.index.get("seconds"),
        "samples": {s: sum(len(b) for b in cache.splits.get(s, [])) for s in cache.splits},
        "buckets": cache.index.get("buckets"),
        "captions": cache.index.get("captions"),
    }
    log.info("latent cache %s (%s): %s", fingerprint, "hit" if hit else "built", summary["samples"])
    return cache, summary
