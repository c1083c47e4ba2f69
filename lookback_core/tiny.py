"""Tiny models of the real SD1.5 architectures, for tests and benchmarks.

They have SD1.5's block structure (so all 21 look-back sites exist) with tiny widths, the real
tokenizer and scheduler, and seeded random weights: nothing needs downloading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .atomic import write_text
from .ldm_export import save_ldm_checkpoint
from .sd15 import SHIPPED_CONFIG_DIR

# SD1.5's block structure (3 cross-attention down blocks + 1 plain, mirrored up), tiny widths.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# 4 blocks keep the real VAE's 8x downsampling; 4 latent channels and the real scaling factor.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=2,
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=32,
    scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower, tiny: the real vocabulary and 77 positions, so the real tokenizer fits.
TINY_TEXT_OVERRIDES = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, projection_dim=32
)


def tiny_config_dir(tmp: str | Path) -> Path:
    """Write ``tmp/tiny_sd15``: the layout of ``configs/sd15`` with tiny models and the real tokenizer."""
    root = Path(tmp) / "tiny_sd15"
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(SHIPPED_CONFIG_DIR / part, root / part, dirs_exist_ok=True)
    shutil.copy(SHIPPED_CONFIG_DIR / "model_index.json", root / "model_index.json")
    text = json.loads((SHIPPED_CONFIG_DIR / "text_encoder" / "config.json").read_text())
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", **TINY_UNET_CONFIG},
        "vae": {"_class_name": "AutoencoderKL", **TINY_VAE_CONFIG},
        "text_encoder": {**text, **TINY_TEXT_OVERRIDES},
    }
    for part, config in configs.items():
        (root / part).mkdir(parents=True, exist_ok=True)
        write_text(root / part / "config.json", json.dumps(config, indent=2))
    return root


def tiny_sd15_models(
    config_dir: str | Path, seed: int = 0
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The diffusers/transformers models a tiny checkpoint holds; the same seed gives the same weights.

    Every weight gets small seeded noise on top of its usual initialisation, so no two tensors
    are equal (a swapped key in a conversion cannot go unnoticed) while norms stay near 1.
    """
    config_dir = Path(config_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return unet.eval(), vae.eval(), text_encoder.eval()


def write_tiny_sd15_checkpoint(
    path: str | Path, *, config_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """Write a tiny SD1.5 single-file checkpoint of the models ``tiny_sd15_models(config_dir, seed)``.

    The format follows the suffix: ``.safetensors``, or ``.ckpt`` as ``{"state_dict": ..., "global_step": 0}``
    (loadable with ``weights_only=True``). Without ``config_dir`` a tiny config dir is written
    next to the file.
    """
    path = Path(path)
    config_dir = Path(config_dir) if config_dir is not None else tiny_config_dir(path.parent)
    return save_ldm_checkpoint(path, *tiny_sd15_models(config_dir, seed))
