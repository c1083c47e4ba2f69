"""Checkpoints for the loader tests: tiny real-format SD1.5 files and just-enough other families."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lookback_core.checkpoint_file import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from lookback_core.ldm_export import to_ldm_state_dict, unet_to_ldm, vae_to_ldm
from lookback_core.sd15 import SHIPPED_CONFIG_DIR
from lookback_core.tiny import tiny_config_dir, tiny_sd15_models, write_tiny_sd15_checkpoint

__all__ = [
    "fake_sd2_state_dict",
    "fake_sdxl_state_dict",
    "tiny_config_dir",
    "tiny_sd15_models",
    "to_ldm_state_dict",
    "unet_to_ldm",
    "vae_to_ldm",
    "write_random_sd15_checkpoint",
    "write_tiny_sd15_checkpoint",
]


def fake_sdxl_state_dict() -> dict[str, torch.Tensor]:
    """Just enough SDXL base keys for family detection (two text encoders, label embedding)."""
    return {
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(1280, 2816),
        UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4),
        "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280),
        VAE_PREFIX + "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }


def fake_sd2_state_dict() -> dict[str, torch.Tensor]:
    """Just enough SD2.x keys for family detection (OpenCLIP text encoder, 1024-dim context)."""
    return {
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
        "cond_stage_model.model.ln_final.weight": torch.zeros(1024),
        VAE_PREFIX + "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }


def write_random_sd15_checkpoint(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A full-size SD1.5 LDM checkpoint with small random weights (what ComfyUI accepts), built
    from the shipped configs' shapes without running any model initialisation."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SHIPPED_CONFIG_DIR / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SHIPPED_CONFIG_DIR / "text_encoder"))
    shapes = {UNET_PREFIX + k: v.shape for k, v in unet_to_ldm(unet.state_dict(), 2).items()}
    shapes |= {VAE_PREFIX + k: v.shape for k, v in vae_to_ldm(vae.state_dict(), 4).items()}
    shapes |= {
        f"{TEXT_PREFIX}text_model.{k.removeprefix('text_model.')}": v.shape
        for k, v in text.state_dict().items()
    }
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1])[None]
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith("weight"):
            state[key] = torch.ones(shape, dtype=dtype)
        else:
            state[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    save_file(state, path)
    return path
