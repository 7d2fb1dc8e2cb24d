"""The registered model: a diffusers SD 1.x/2.x or SDXL pipeline behind MLflow's pyfunc API.

MLflow logs this file as code ("models from code") and runs it when the model loads, so it
imports nothing from ``sd_pipeline``: a serving environment needs only mlflow, diffusers,
torch, pandas and Pillow. Input: a DataFrame with ``prompt`` and optional ``seed``,
``num_inference_steps``, ``guidance_scale``. Output: a DataFrame whose ``image`` column
holds PNG bytes (the MLflow scoring server sends them base64-encoded).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

BASE_MODEL = "base_model"
WEIGHTS = "weights"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5


class StableDiffusionModel(PythonModel):
    """Loads the base pipeline (SDXL's when the base is SDXL), then the fine-tuned LoRA weights
    or full UNet (and text encoder, when the run trained it) on top."""

    def load_context(self, context: Any) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        base = Path(context.artifacts[BASE_MODEL])
        weights = Path(context.artifacts[WEIGHTS])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
        lora = weights / LORA_WEIGHTS_FILE
        if (weights / "unet").is_dir():
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(
                weights / "unet", dtype=dtype, use_safetensors=True
            )
            if (weights / "text_encoder").is_dir():  # the run trained the text encoder too
                from transformers import CLIPTextModel

                kwargs["text_encoder"] = CLIPTextModel.from_pretrained(
                    weights / "text_encoder", dtype=dtype, use_safetensors=True
                )
        elif not lora.is_file():
            raise FileNotFoundError(
                f"fine-tuned weights in {weights} hold neither unet/ nor {LORA_WEIGHTS_FILE}; "
                "log the run's final/ folder as the weights"
            )
        pipe = pipeline_class(base).from_pretrained(base, **kwargs)
        if "unet" not in kwargs:
            pipe.load_lora_weights(str(weights), weight_name=LORA_WEIGHTS_FILE)
            # Merged into the base weights, LoRA costs nothing per step; unmerged PEFT
            # layers made a tiny UNet's forward pass 40x slower on CPU.
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    # With a DataFrame hint MLflow skips type-hint validation and checks the logged signature.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column; got columns {list(model_input.columns)}")
        images = []
        for _, row in model_input.iterrows():
            seed = _value(row, "seed", 0)
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
            image = self.pipe(
                str(row["prompt"]),
                num_inference_steps=int(_value(row, "num_inference_steps", DEFAULT_STEPS)),
                guidance_scale=float(_value(row, "guidance_scale", DEFAULT_GUIDANCE)),
                generator=generator,
                output_type="pil",
            ).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            images.append(buf.getvalue())
        return pd.DataFrame({"image": images})


def pipeline_class(base: Path) -> Any:
    """The diffusers pipeline class for a base folder, from ``model_index.json``'s ``_class_name``.

    Only the two this project trains: ``StableDiffusionXLPipeline`` for SDXL bases,
    ``StableDiffusionPipeline`` for SD 1.x/2.x; anything else is refused rather than run
    through whatever class the folder names.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = Path(base) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "")
    if name.startswith("StableDiffusionXL"):
        return StableDiffusionXLPipeline
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return StableDiffusionPipeline
    raise ValueError(
        f"base model {base} is a {name or 'pipeline without _class_name'} ({index}); this model serves "
        "Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) bases"
    )


def _value(row: pd.Series, column: str, default: Any) -> Any:
    value = row.get(column)
    return default if value is None or pd.isna(value) else value


set_model(StableDiffusionModel())
