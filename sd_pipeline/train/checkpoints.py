"""Training checkpoints in the store: trainable weights, optimizer and RNG states, resumable.

``runs/<run_id>/checkpoints/step-N/`` holds ``trainable.safetensors`` (and ``ema.safetensors``),
``training_state.pt`` (optimizer, LR schedule, grad scaler and RNG states, read back with
``weights_only=True``) and ``state.json`` (fingerprint, data position, recent losses);
``_COMMITTED`` is written last and only the newest ``keep`` committed checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sd_pipeline.storage import COMMITTED, Store

if TYPE_CHECKING:
    import torch

KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_prefix(run_id: str) -> str:
    return f"runs/{run_id}/checkpoints"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{checkpoints_prefix(run_id)}/step-{step}"


@dataclass
class Checkpoint:
    step: int
    trainable: Mapping[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]  # JSON: fingerprint, recent losses, data position
    ema: Mapping[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # LR scheduler, grad scaler states


def committed_steps(store: Store, run_id: str) -> list[int]:
    """Steps with a committed checkpoint, oldest first."""
    base = checkpoints_prefix(run_id)
    steps = set()
    for key in store.list(base):
        parts = key[len(base) + 1 :].split("/")
        match = _STEP_DIR.match(parts[0])
        if match and parts[1:] == [COMMITTED]:
            steps.add(int(match.group(1)))
    return sorted(steps)


def save_checkpoint(store: Store, run_id: str, ckpt: Checkpoint, keep: int = KEEP) -> str:
    """Upload and commit one checkpoint, drop older ones beyond ``keep``; returns its prefix."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    prefix = checkpoint_prefix(run_id, ckpt.step)
    _, np_keys, np_pos, np_has_gauss, np_gauss = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True)
    )
    training_state = {
        "optimizer": ckpt.optimizer,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {  # as tensors and numbers: what torch.load(weights_only=True) reads
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python_rng": random.getstate(),
        "extra": ckpt.extra,
    }
    store.delete_prefix(prefix)  # leftovers of a crashed attempt at this step
    with tempfile.TemporaryDirectory(prefix="sd-ckpt-") as tmp:
        folder = Path(tmp)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in ckpt.trainable.items()},
            folder / "trainable.safetensors",
        )
        if ckpt.ema is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in ckpt.ema.items()}, folder / "ema.safetensors"
            )
        torch.save(training_state, folder / "training_state.pt")
        (folder / "state.json").write_text(json.dumps({"step": ckpt.step, **ckpt.state}))
        store.upload_dir(folder, prefix)
    store.commit(prefix, {"step": ckpt.step})
    for old in committed_steps(store, run_id)[:-keep]:
        delete_checkpoint(store, run_id, old)
    return prefix


def delete_checkpoint(store: Store, run_id: str, step: int) -> None:
    prefix = checkpoint_prefix(run_id, step)
    # Unpublish first, so a half-deleted checkpoint never reads as whole.
    store.delete_prefix(f"{prefix}/{COMMITTED}")
    store.delete_prefix(prefix)


def load_checkpoint(store: Store, run_id: str, step: int) -> Checkpoint:
    """Read a committed checkpoint back and restore the torch, numpy and Python RNG states."""
    import numpy as np
    import torch
    from safetensors.torch import load

    prefix = checkpoint_prefix(run_id, step)
    trainable = load(store.get_bytes(f"{prefix}/trainable.safetensors"))
    with tempfile.TemporaryDirectory(prefix="sd-ckpt-") as tmp:
        path = store.get_file(f"{prefix}/training_state.pt", Path(tmp) / "training_state.pt")
        training_state = torch.load(path, map_location="cpu", weights_only=True)
    state = store.get_json(f"{prefix}/state.json")
    ema_key = f"{prefix}/ema.safetensors"
    ema = load(store.get_bytes(ema_key)) if store.exists(ema_key) else None

    torch.set_rng_state(training_state["torch_rng"])
    np_rng = training_state["numpy_rng"]
    np.random.set_state(
        (
            "MT19937",
            np_rng["keys"].numpy().astype(np.uint32),
            np_rng["pos"],
            np_rng["has_gauss"],
            np_rng["cached_gaussian"],
        )
    )
    py_state = training_state["python_rng"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return Checkpoint(
        step=step,
        trainable=trainable,
        optimizer=training_state["optimizer"],
        state=state,
        ema=ema,
        extra=training_state.get("extra") or {},
    )
