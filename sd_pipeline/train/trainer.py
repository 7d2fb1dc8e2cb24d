"""The train stage: fine-tune a base model's UNet (LoRA or full) on dataset versions.

Training reads the latent cache (sd_pipeline.train.cache): the VAE encoder and the frozen
text encoders never run here when it is warm. Each micro-step draws its bucket batch,
latents, noise and timesteps from generators seeded by (seed, micro-step), so a run resumed
from a checkpoint retraces the uninterrupted one. With several processes (``accelerate
launch``) each rank takes its own micro-batch of the step and DDP averages the gradients.
Results are published under ``runs/<run_id>/final/`` with the marker written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline.config import PipelineConfig
from sd_pipeline.storage import Store
from sd_pipeline.train.buckets import BatchSchedule, derive_seed
from sd_pipeline.train.checkpoints import Checkpoint, committed_steps, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from sd_pipeline.train.cache import BucketData

log = logging.getLogger("sd_pipeline.train")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LOSS_WINDOW = 10  # final_loss is the mean of the last LOSS_WINDOW step losses
READ_EVERY = 10  # steps between reads of the losses from the device (and the non-finite check)
WARMUP_STEPS = 5  # steps left out of the steady-state samples/s
# Train-config fields that change how a run is watched or kept, never its weights.
NOT_IN_FINGERPRINT = ("steps", "checkpoint_every", "checkpoints_keep", "log_every", "validate_every")


def final_prefix(run_id: str) -> str:
    return f"runs/{run_id}/final"


def dataset_versions(store: Store, config: PipelineConfig) -> list[str]:
    """The committed versions ``dataset.version`` names (``latest``, ids, ``last:N``, ``window:Nd``)."""
    from sd_pipeline.ingest.versions import resolve_versions

    return resolve_versions(store, config.dataset.name, config.dataset.version)


def train(config: PipelineConfig, run_id: str) -> dict[str, Any]:
    """Train ``run_id`` on the config's dataset versions and publish it; idempotent.

    Returns ``run_id, final_uri, method, steps, seconds, samples_per_s, final_loss``. A run
    whose final weights are already committed is returned as is; one with committed
    checkpoints resumes from the newest.
    """
    _check_run_id(run_id)
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    versions = dataset_versions(store, config)
    fingerprint = training_fingerprint(config, versions)
    final = final_prefix(run_id)
    if store.is_committed(final):
        return _already_trained(store, run_id, fingerprint, config.train.steps)
    return _Run(config, run_id, store, versions, fingerprint).run()


def training_fingerprint(config: PipelineConfig, versions: list[str]) -> str:
    """Hash of what shapes the weights (not how many steps run, nor how they are watched)."""
    train = config.train.model_dump(mode="json")
    for name in NOT_IN_FINGERPRINT:
        train.pop(name, None)
    payload = {
        "model": config.model.model_dump(mode="json"),
        "dataset": {
            "name": config.dataset.name,
            "versions": versions,
            "resolution": config.dataset.resolution,
        },
        "train": train,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Precision:
    name: str  # no | fp16 | bf16
    device: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The half-precision dtype of autocast; None for fp32."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name)

    @property
    def autocast(self) -> Any:
        import torch

        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 (``no``) on CPU."""
    import torch

    if device.type != "cuda":
        if requested in ("fp16", "bf16"):
            raise ValueError(
                f"train.mixed_precision={requested!r} needs a GPU; on CPU training runs in fp32 "
                "(set it to 'auto' or 'no')"
            )
        return Precision("no", device.type)
    if requested == "auto":
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(requested, device.type)


class _Run:
    """One training run: set-up, the loop, checkpoints and publishing."""

    def __init__(
        self, config: PipelineConfig, run_id: str, store: Store, versions: list[str], fingerprint: str
    ) -> None:
        self.config, self.run_id, self.store = config, run_id, store
        self.versions, self.fingerprint = versions, fingerprint
        self.tc = config.train

    # -- set-up ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import numpy as np
        import torch
        from accelerate import Accelerator

        from sd_pipeline.models.base import default_cache_dir, model_digest, resolve_base_model
        from sd_pipeline.train.cache import ensure_cache

        config, tc = self.config, self.tc
        _check_optimizer(tc.optimizer)
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.acc, self.device = acc, acc.device
        self.precision = resolve_precision(tc.mixed_precision, self.device)
        base_path = resolve_base_model(
            config.model.base, default_cache_dir(), endpoint_url=config.storage.endpoint_url
        )
        if self.device.type == "cuda":  # refuse what cannot fit before loading anything
            from sd_pipeline.train.memory import check_fits, estimate

            capacity = torch.cuda.get_device_properties(self.device).total_memory
            check_fits(
                estimate(base_path, tc, config.dataset.resolution, self.precision.name),
                capacity,
                f"training {config.model.base} ({tc.method}) at {config.dataset.resolution} px",
            )
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)

        t0 = time.perf_counter()
        if acc.is_main_process:
            cache, self.cache_summary = ensure_cache(
                config, self.store, self.versions, base_path, splits=("train",)
            )
        acc.wait_for_everyone()
        if not acc.is_main_process:
            cache, self.cache_summary = ensure_cache(
                config, self.store, self.versions, base_path, splits=("train",)
            )
        self.cache_seconds = time.perf_counter() - t0
        self.data: list[BucketData] = cache.split("train")
        self.captions = cache.captions
        self.schedule = BatchSchedule([len(b) for b in self.data], tc.batch_size, tc.seed)
        small = self.schedule.small_buckets()
        if small:
            log.warning(
                "buckets smaller than a batch of %d (trained as smaller batches, not dropped): %s",
                tc.batch_size,
                {self.data[i].bucket.name: n for i, n in small.items()},
            )
        self._load_model(base_path)
        self.base = {"uri": config.model.base, "path": str(base_path), "sha256": model_digest(base_path)}
        return self._train()

    def _load_model(self, base_path: Path) -> None:
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        config, tc = self.config, self.tc
        weights: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "dtype": torch.float32}
        self.unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", **weights)
        self.noise_scheduler = DDPMScheduler.from_pretrained(base_path, subfolder="scheduler")
        if config.model.prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=config.model.prediction_type)
        self.vae_config = json.loads((base_path / "vae" / "config.json").read_text())
        self.is_sdxl = self.captions.pooled is not None
        self.text_encoder: Any = None
        self.tokenizer: Any = None
        if tc.train_text_encoder:
            if (base_path / "text_encoder_2").exists():
                raise ValueError(
                    "train.train_text_encoder is supported for SD 1.x/2.x bases; this base has two text "
                    "encoders (SDXL): set train.train_text_encoder to false"
                )
            from transformers import CLIPTextModel, CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(
                base_path, subfolder="tokenizer", local_files_only=True
            )
            self.text_encoder = CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder", **weights)
        self.unet.requires_grad_(False)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)
        if tc.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.text_encoder is not None:
                self.text_encoder.gradient_checkpointing_enable()
        half = self.precision.dtype if tc.method == "lora" and self.device.type == "cuda" else None
        if half is not None:
            # LoRA freezes the base: keep its weights in the autocast dtype (half the memory, no
            # per-step casts), as diffusers' LoRA script does; the adapters stay fp32 (below).
            self.unet.to(dtype=half)
        self.params = self._make_trainable()
        if half is not None:
            for p in self.params:
                p.data = p.data.float()
        self.modules = {"unet": self.unet} | (
            {"text_encoder": self.text_encoder} if self.text_encoder else {}
        )
        for module in self.modules.values():
            module.to(self.device)
        if tc.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and the published weights
            # stay those of the plain module. Compiling happens on the first step.
            self.unet.compile()
            log.info(
                "train.compile: the UNet compiles during the first step (minutes for a full-size UNet, "
                "less with inductor's disk cache); steady-state samples/s leaves the first steps out"
            )
        self.named = {
            f"{name}.{n}": p
            for name, m in self.modules.items()
            for n, p in m.named_parameters()
            if p.requires_grad
        }

    def _make_trainable(self) -> list[torch.nn.Parameter]:
        tc = self.tc
        if tc.method == "lora":
            from peft import LoraConfig

            alpha = tc.lora_alpha or tc.lora_rank
            self.unet.add_adapter(
                LoraConfig(
                    r=tc.lora_rank,
                    lora_alpha=alpha,  # type: ignore[arg-type]
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGETS,
                )
            )
            if self.text_encoder is not None:
                # peft directly: transformers' add_adapter wants a newer peft than is released.
                from peft import inject_adapter_in_model

                text_lora = LoraConfig(
                    r=tc.lora_rank,
                    lora_alpha=alpha,  # type: ignore[arg-type]
                    init_lora_weights="gaussian",
                    target_modules=TEXT_LORA_TARGETS,
                )
                inject_adapter_in_model(text_lora, self.text_encoder, adapter_name="default")
                self.text_encoder.peft_config = {"default": text_lora}
        else:
            self.unet.requires_grad_(True)
            if self.text_encoder is not None:
                self.text_encoder.requires_grad_(True)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.text_encoder is not None:
            params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"method {tc.method!r} left nothing to train")
        return params

    # -- the loop -------------------------------------------------------------------------

    def _train(self) -> dict[str, Any]:
        import torch
        from diffusers.optimization import get_scheduler

        from sd_pipeline.train.monitor import StepLogger, memory_bytes

        tc, acc = self.tc, self.acc
        self.optimizer = _optimizer(tc, self.params)
        self.lr_scheduler = get_scheduler(
            tc.lr_scheduler, self.optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.steps
        )
        self.ema = {n: p.detach().clone().float() for n, p in self.named.items()} if tc.ema else None
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.name == "fp16" else None
        start, recent = self._resume()
        if acc.num_processes > 1:
            self.unet = acc.prepare(self.unet)
        monitor = StepLogger(
            self.config.registry,
            self.run_id,
            tc.steps,
            start,
            enabled=tc.log_every > 0 and acc.is_main_process,
        )
        every = max(1, tc.steps // 10)
        samples = 0
        # Steady state excludes the first steps (allocator and kernel warm-up), as benchmarks do.
        warm_steps = min(WARMUP_STEPS, max(1, (tc.steps - start) // 5))
        self.steady: tuple[float, int] | None = None
        self.steady_rate: float | None = None
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        loss = grad_norm = float("nan")
        with _deterministic(self.device):
            for module in self.modules.values():
                module.train()
            t0 = time.perf_counter()
            for step in range(start + 1, tc.steps + 1):
                loss_t, grad_t, n = self._step(step)
                samples += n * acc.num_processes
                pending.append((step, loss_t, grad_t))
                log_due = bool(tc.log_every) and step % tc.log_every == 0
                checkpoint_due = bool(tc.checkpoint_every) and step % tc.checkpoint_every == 0
                validate_due = bool(tc.validate_every) and step % tc.validate_every == 0
                if (
                    step % READ_EVERY == 0
                    or step in (start + warm_steps, tc.steps)
                    or log_due
                    or checkpoint_due
                    or validate_due
                    or step % every == 0
                ):
                    recent, loss, grad_norm = self._read_losses(pending, recent)
                if step == start + warm_steps:
                    self.steady = (time.perf_counter(), samples)
                lr = float(self.lr_scheduler.get_last_lr()[0])
                monitor.advance(loss, lr)
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                if log_due:
                    monitor.log(
                        step,
                        {
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "samples_per_s": rate,
                            "memory_bytes": memory_bytes(self.device),
                        },
                    )
                if step % every == 0 or step == tc.steps:
                    log.info(
                        "step %d/%d loss %.4f lr %.2e grad-norm %.3f (%.1f samples/s)",
                        step,
                        tc.steps,
                        loss,
                        lr,
                        grad_norm,
                        rate,
                    )
                if validate_due and acc.is_main_process:
                    self._validate(step, monitor)
                if checkpoint_due:
                    self._save_checkpoint(step, recent)
            seconds = time.perf_counter() - t0
            if self.steady is not None and samples > self.steady[1]:
                t_warm, s_warm = self.steady
                self.steady_rate = (samples - s_warm) / max(time.perf_counter() - t_warm, 1e-9)
        monitor.close()
        return self._finish(start, seconds, samples, recent)

    def _read_losses(
        self, pending: list[tuple[int, torch.Tensor, torch.Tensor]], recent: list[float]
    ) -> tuple[list[float], float, float]:
        """One device-to-host read for the steps since the last (a GPU keeps its queue full in
        between instead of waiting on each step's loss); refuses a non-finite loss by its step.

        Empties ``pending``; returns the recent-loss window and the newest loss and grad norm.
        """
        import torch

        values = torch.stack([torch.stack([lo, g]) for _, lo, g in pending]).tolist()
        for (at, _, _), (value, _) in zip(pending, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {at} of run {self.run_id}; lower train.learning_rate "
                    f"(now {self.tc.learning_rate}) or raise train.lr_warmup_steps"
                )
            recent = (recent + [value])[-LOSS_WINDOW:]
        pending.clear()
        loss, grad_norm = values[-1]
        return recent, loss, grad_norm

    def _step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches per process.

        Returns the loss and the gradient norm as device tensors: reading them is left to the
        loop, which does it every few steps rather than stalling the GPU on each.
        """
        import torch

        tc, acc = self.tc, self.acc
        accum = tc.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total: Any = 0.0
        samples = 0
        for k in range(accum):
            micro = ((step - 1) * accum + k) * acc.num_processes + acc.process_index + 1
            sync = k == accum - 1
            ctx = acc.no_sync(self.unet) if (acc.num_processes > 1 and not sync) else nullcontext()
            with ctx:
                with self.precision.autocast:
                    loss, n = self._loss(micro)
                scaled = loss / accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total = total + loss.detach().float() / accum
            samples += n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if tc.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        else:
            grads = [p.grad.detach() for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self._update_ema(step)
        return total, grad_norm.detach().float().to(total.device), samples

    def _loss(self, micro: int) -> tuple[torch.Tensor, int]:
        import torch
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        tc = self.tc
        bucket_index, rows = self.schedule.batch(micro)
        data = self.data[bucket_index]
        idx = torch.tensor(rows)
        gen = torch.Generator().manual_seed(derive_seed(tc.seed, "step", micro))
        latents = _draw_latents(data.mean[idx], data.std[idx], self.vae_config, gen)
        noise = torch.randn(latents.shape, generator=gen)
        if tc.noise_offset:
            noise = noise + tc.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        scheduler = self.noise_scheduler
        timesteps = torch.randint(0, scheduler.config["num_train_timesteps"], (len(idx),), generator=gen)
        caption_rows = data.caption_index[idx]
        drop = (torch.rand(len(idx), generator=gen) < tc.caption_dropout) if tc.caption_dropout > 0 else None
        hidden, added = self._conditioning(caption_rows, drop, data, idx)

        latents, noise = self._to_device(latents), self._to_device(noise)
        timesteps = self._to_device(timesteps)
        noisy = scheduler.add_noise(latents, noise, timesteps)  # type: ignore[arg-type]
        prediction_type = scheduler.config["prediction_type"]
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[arg-type]
        else:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not trainable here; "
                "set model.prediction_type to epsilon or v_prediction"
            )
        pred = self.unet(
            noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
        )[0]
        if tc.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float()), len(idx)
        # Min-SNR-gamma (Hang et al. 2023): down-weight the easy, low-noise timesteps.
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=tc.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean(), len(idx)

    def _conditioning(
        self, rows: torch.Tensor, drop: torch.Tensor | None, data: BucketData, idx: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        caps = self.captions
        if self.text_encoder is not None:
            texts = [caps.texts[int(r)] for r in rows]
            if drop is not None:
                texts = ["" if d else t for t, d in zip(texts, drop.tolist(), strict=True)]
            ids = self.tokenizer(
                texts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            return self.text_encoder(self._to_device(ids))[0], None
        hidden = caps.hidden[rows]
        pooled = caps.pooled[rows] if caps.pooled is not None else None
        if drop is not None:
            hidden[drop] = caps.empty_hidden
            if pooled is not None and caps.empty_pooled is not None:
                pooled[drop] = caps.empty_pooled
        added = None
        if pooled is not None:
            from sd_pipeline.models.conditioning import sdxl_conditions

            added = sdxl_conditions(
                pooled,
                data.original_size[idx],
                data.crop_top_left[idx],
                (data.bucket.height, data.bucket.width),
            )
            added = {k: self._to_device(v) for k, v in added.items()}
        return self._to_device(hidden), added

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor made on the host, to the device without waiting for the GPU's queue.

        A plain ``.to("cuda")`` from pageable memory synchronises with the stream, i.e. waits for
        the previous step to finish; a copy from pinned memory is queued like a kernel.
        """
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _update_ema(self, step: int) -> None:
        import torch

        assert self.ema is not None
        decay = min(self.tc.ema_decay, (1 + step) / (10 + step))  # warm-up, as diffusers' EMAModel
        names = list(self.named)
        with torch.no_grad():  # one fused pass over all tensors: ema += (1 - decay) * (param - ema)
            torch._foreach_lerp_(
                [self.ema[n] for n in names], [self.named[n].detach().float() for n in names], 1 - decay
            )

    # -- checkpoints ----------------------------------------------------------------------

    def _save_checkpoint(self, step: int, recent: list[float]) -> None:
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        extra = {"lr_scheduler": self.lr_scheduler.state_dict()}
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(
            self.store,
            self.run_id,
            Checkpoint(
                step=step,
                trainable=self.named,
                optimizer=self.optimizer.state_dict(),
                state={
                    "fingerprint": self.fingerprint,
                    "recent_losses": recent,
                    "data_position": step,
                    "versions": self.versions,
                },
                ema={f"ema.{k}": v for k, v in self.ema.items()} if self.ema is not None else None,
                extra=extra,
            ),
            keep=self.tc.checkpoints_keep,
        )
        self.acc.wait_for_everyone()

    def _resume(self) -> tuple[int, list[float]]:
        """Load the newest committed checkpoint (if any): weights, optimizer, schedule, EMA, RNG."""
        import torch

        done = [s for s in committed_steps(self.store, self.run_id) if s <= self.tc.steps]
        if not done:
            return 0, []
        ckpt = load_checkpoint(self.store, self.run_id, done[-1])
        if ckpt.state.get("fingerprint") != self.fingerprint or set(ckpt.trainable) != set(self.named):
            raise ValueError(
                f"run {self.run_id!r} has checkpoints from a different model, dataset or train config; "
                f"use a new run id, or delete {self.store.uri(f'runs/{self.run_id}/checkpoints')} "
                "to start over"
            )
        with torch.no_grad():
            for name, param in self.named.items():
                param.copy_(ckpt.trainable[name])
            if self.ema is not None:
                if ckpt.ema is None:
                    raise ValueError(f"checkpoint step {ckpt.step} of run {self.run_id!r} has no EMA weights")
                for name in self.ema:
                    self.ema[name].copy_(ckpt.ema[f"ema.{name}"])
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.lr_scheduler.load_state_dict(ckpt.extra["lr_scheduler"])
        if self.scaler is not None and "grad_scaler" in ckpt.extra:
            self.scaler.load_state_dict(ckpt.extra["grad_scaler"])
        log.info("resuming run %s from step %d", self.run_id, ckpt.step)
        return ckpt.step, list(ckpt.state["recent_losses"])

    # -- validation and publishing --------------------------------------------------------

    def _validate(self, step: int, monitor: Any) -> None:
        """Sample the evaluation prompts with the weights as they are, logged to MLflow."""
        from sd_pipeline.train.validation import validation_grid

        try:
            unet = self._unwrapped_unet()
            with self.precision.autocast:  # a LoRA base held in bf16/fp16 beside an fp32 VAE
                png = validation_grid(self.config, Path(self.base["path"]), unet, self.device)
        except Exception as err:  # noqa: BLE001 - a failed preview must not stop training
            log.warning("validation images at step %d failed: %s", step, err)
            return
        monitor.log_image(step, png)

    def _unwrapped_unet(self) -> Any:
        return self.acc.unwrap_model(self.unet)

    def _finish(self, start: int, seconds: float, samples: int, recent: list[float]) -> dict[str, Any]:
        import numpy as np
        import torch

        tc, store, final = self.tc, self.store, final_prefix(self.run_id)
        self.unet = self._unwrapped_unet()
        self.modules["unet"] = self.unet
        if self.ema is not None:  # publish the averaged weights
            with torch.no_grad():
                for name, param in self.named.items():
                    param.copy_(self.ema[name])
        steps_run = tc.steps - start
        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "final_uri": store.uri(final),
            "method": tc.method,
            "steps": tc.steps,
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 3) if steps_run and seconds > 0 else 0.0,
            "final_loss": float(np.mean(recent)) if recent else float("nan"),
        }
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return summary
        sizes = {b.bucket.name: len(b) for b in self.data}
        metadata = {
            **summary,
            "resumed_from_step": start,
            "steady_samples_per_s": round(self.steady_rate, 3) if self.steady_rate else None,
            "batch_size": tc.batch_size,
            "effective_batch_size": tc.batch_size * tc.gradient_accumulation_steps * self.acc.num_processes,
            "processes": self.acc.num_processes,
            "mixed_precision": self.precision.name,
            "prediction_type": self.noise_scheduler.config["prediction_type"],
            "fingerprint": self.fingerprint,
            "base_model": self.base,
            "dataset": {
                "name": self.config.dataset.name,
                # One version when one was trained on (what older readers expect), else the list.
                "version": self.versions[0] if len(self.versions) == 1 else ",".join(self.versions),
                "versions": self.versions,
                "train_samples": sum(sizes.values()),
                "buckets": sizes,
            },
            "cache": {**self.cache_summary, "load_seconds": round(self.cache_seconds, 3)},
            "ema": tc.ema,
            "config": self.config.model_dump(mode="json"),
            "device": str(self.device),
            "versions": _versions(),
        }
        _publish(store, final, self.modules, self.config, metadata)
        store.commit(final, summary)
        self.acc.wait_for_everyone()
        log.info(
            "trained run %s (%s) on %s/%s: %d steps in %.1f s (%.1f samples/s), final loss %.4f",
            self.run_id,
            tc.method,
            self.config.dataset.name,
            ",".join(self.versions),
            steps_run,
            seconds,
            summary["samples_per_s"],
            summary["final_loss"],
        )
        return summary


def _draw_latents(
    mean: torch.Tensor, std: torch.Tensor, vae_config: dict[str, Any], generator: torch.Generator | None
) -> torch.Tensor:
    """A latent drawn from the cached distribution (its mean without a generator), SD-scaled."""
    import torch

    latents = mean if generator is None else mean + std * torch.randn(mean.shape, generator=generator)
    shift = vae_config.get("shift_factor")
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.get("scaling_factor", 0.18215)


def _check_optimizer(name: str) -> None:
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, on a CUDA "
                "machine); use train.optimizer=adamw"
            ) from None


def _optimizer(tc: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import torch

    if tc.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)
    # The fused kernel (one pass over all parameters, CPU and CUDA) where torch has one for these
    # parameters; it is several times faster than the per-tensor loop (benchmarks/train.py).
    try:
        return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay, fused=True)
    except (RuntimeError, ValueError) as err:
        log.debug("fused AdamW is not available here (%s); using the foreach implementation", err)
        return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)


def _publish(
    store: Store, prefix: str, modules: dict[str, Any], config: PipelineConfig, metadata: dict[str, Any]
) -> None:
    store.delete_prefix(prefix)  # leftovers of a crashed attempt
    unet, text_encoder = modules["unet"], modules.get("text_encoder")
    flat_meta = {"sd_pipeline": json.dumps(metadata, sort_keys=True, default=str)}
    with tempfile.TemporaryDirectory(prefix="sd-final-") as tmp:
        folder = Path(tmp)
        if config.train.method == "lora":
            from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            def layers(module: Any) -> dict[str, Any]:
                state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
                return {k: v.detach().cpu().contiguous() for k, v in state.items()}

            def adapter(module: Any) -> dict[str, Any]:
                return {
                    k: sorted(v) if isinstance(v, set) else v
                    for k, v in module.peft_config["default"].to_dict().items()
                }

            extra: dict[str, Any] = {}
            if text_encoder is not None:
                extra = {
                    "text_encoder_lora_layers": layers(text_encoder),
                    "text_encoder_lora_adapter_metadata": adapter(text_encoder),
                }
            StableDiffusionLoraLoaderMixin.save_lora_weights(
                folder,
                unet_lora_layers=layers(unet),
                safe_serialization=True,
                unet_lora_adapter_metadata=adapter(unet),
                **extra,
            )
            _embed_metadata(folder / LORA_WEIGHTS, flat_meta)
            metadata["weights"] = LORA_WEIGHTS
        else:
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            for file in (folder / "unet").glob("*.safetensors"):
                _embed_metadata(file, flat_meta)
            if text_encoder is not None:
                text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            metadata["weights"] = "unet"
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        store.upload_dir(folder, prefix)


def _embed_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with the run's metadata added to its header."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    save_file(tensors, str(path), metadata={**meta, **extra})


def _already_trained(store: Store, run_id: str, fingerprint: str, steps: int) -> dict[str, Any]:
    meta = store.get_json(f"{final_prefix(run_id)}/metadata.json")
    if meta.get("fingerprint") != fingerprint or meta.get("steps") != steps:
        raise ValueError(
            f"run {run_id!r} is already trained with a different model, dataset or train config "
            f"(see {store.uri(final_prefix(run_id))}/metadata.json); use a new run id"
        )
    log.info("run %s is already trained (%s); nothing to do", run_id, store.uri(final_prefix(run_id)))
    keys = ("run_id", "final_uri", "method", "steps", "seconds", "samples_per_s", "final_loss")
    return {k: meta[k] for k in keys}


def _check_run_id(run_id: str) -> None:
    if not run_id or "/" in run_id or run_id.startswith(".") or run_id != run_id.strip():
        raise ValueError(f"run id {run_id!r} must be a non-empty name without '/' or leading '.'")


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training on CPU (free there), restoring the caller's setting."""
    import torch

    if device.type != "cpu":
        yield
        return
    was, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        (torch.is_deterministic_algorithms_warn_only_enabled()),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    from sd_pipeline import __version__

    return {
        "sd_pipeline": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
