"""Look-Back Model Loader: an SD1.5 checkpoint combined with look-back temporal weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lookback_core.precision import DTYPES
from lookback_core.sd15 import load_sd15
from lookback_core.temporal_unet import LookBackUNet
from lookback_core.weights import load_lookback_unet

from . import host

CATEGORY = "Look-Back I2V"


@dataclass
class LookBackModel:
    """What flows along a LOOKBACK_MODEL link."""

    model: LookBackUNet
    scheduler_config: dict[str, Any]
    precision: str
    name: str

    @property
    def context_dim(self) -> int:
        return int(self.model.unet.config.cross_attention_dim)


def load_lookback_model(
    checkpoint_path: str, weights_path: str, precision: str = "auto", config_dir: str | None = None
) -> LookBackModel:
    """Load the UNet of an SD1.5 checkpoint and attach the temporal weights (on the offload device).

    ``config_dir`` replaces the shipped SD1.5 configs (for tiny test models only).
    """
    components = load_sd15(checkpoint_path, config_dir=config_dir, device=host.offload_device())
    model = load_lookback_unet(weights_path, components.unet)
    del components.vae, components.text_encoder  # ComfyUI's own VAE and CLIP do that work
    return LookBackModel(model.eval(), components.scheduler_config, precision, str(weights_path))


class LookBackModelLoader:
    """Loads an SD1.5 checkpoint from ``checkpoints`` and look-back weights from ``lookback``."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LOOKBACK_MODEL",)
    RETURN_NAMES = ("lookback_model",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Combines a Stable Diffusion 1.5 checkpoint with look-back temporal weights (trained with "
        "training/train.py) into an image-to-video model."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ckpt_name": (
                    host.model_files("checkpoints"),
                    {"tooltip": "An SD1.5 checkpoint (the one the look-back weights were trained on)."},
                ),
                "lookback_name": (
                    host.model_files(host.LOOKBACK_FOLDER),
                    {"tooltip": "Look-back temporal weights (.safetensors) from models/lookback."},
                ),
                "precision": (
                    ["auto", *DTYPES],
                    {
                        "default": "auto",
                        "tooltip": "Compute precision; auto is fp16/bf16 on GPUs, fp32 on CPUs.",
                    },
                ),
            }
        }

    def load(self, ckpt_name: str, lookback_name: str, precision: str) -> tuple[LookBackModel]:
        checkpoint = host.model_path("checkpoints", ckpt_name)
        weights = host.model_path(host.LOOKBACK_FOLDER, lookback_name)
        return (load_lookback_model(checkpoint, weights, precision),)
