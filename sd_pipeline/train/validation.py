"""Validation images while training: the evaluation prompts sampled with the weights as they are."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sd_pipeline.config import PipelineConfig

VALIDATION_PROMPTS = 4  # the first prompts of the evaluation set; one seed each


def validation_grid(config: PipelineConfig, base_path: Path, unet: Any, device: Any) -> bytes:
    """A PNG row of samples, one per prompt, at a fixed seed: comparable from step to step."""
    import torch
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from sd_pipeline.evaluate.grids import image_grid
    from sd_pipeline.evaluate.prompts import load_prompt_set

    ev = config.evaluate
    prompts = load_prompt_set(ev.prompt_set, ev.prompts, endpoint_url=config.storage.endpoint_url).prompts
    was_training = unet.training
    pipe = DiffusionPipeline.from_pretrained(
        base_path, unet=unet, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    size = config.dataset.resolution
    images = []
    try:
        unet.eval()
        for prompt in prompts[:VALIDATION_PROMPTS]:
            gen = torch.Generator(device="cpu").manual_seed(ev.seeds[0])
            out = pipe(  # type: ignore[operator]  # from_pretrained returns the concrete pipeline
                prompt,
                num_inference_steps=ev.num_inference_steps,
                guidance_scale=ev.guidance_scale,
                height=size,
                width=size,
                generator=gen,
            )
            images.append(out.images[0])
    finally:
        unet.train(was_training)
    buf = io.BytesIO()
    image_grid([images], size).save(buf, format="PNG")
    return buf.getvalue()
