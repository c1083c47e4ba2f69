"""Tiny SD1.5-architecture checkpoints in the original LDM single-file layout, for tests.

The models have SD1.5's block structure (so the 21 look-back sites exist) with tiny widths. They
are built as diffusers/transformers models with seeded random weights, and their state dicts are
renamed to the LDM layout by the mapping below: the inverse of what diffusers' single-file
converter does, written independently so that a round trip through the loader checks both.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lookback_core.sd15 import SHIPPED_CONFIG_DIR, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

from .conftest import TINY_UNET_CONFIG

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

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


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
        (root / part / "config.json").write_text(json.dumps(config, indent=2))
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


def _resnet(rest: str) -> str:
    first, _, leaf = rest.partition(".")
    return f"{_RESNET_TO_LDM[first]}.{leaf}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM names (without the prefix).

    LDM numbers the UNet's layers flatly: input block 0 is conv_in, then each down block
    contributes ``layers_per_block`` (resnet, attention) pairs and a down-sampler; each up block
    contributes ``layers_per_block + 1`` pairs, its up-sampler riding in the block's last one.
    """
    stride = layers_per_block + 1
    up_with_attention = {
        int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if name in _UNET_TOP_TO_LDM:
            out[f"{_UNET_TOP_TO_LDM[name]}.{leaf}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = stride * block + layer + 1
            out[
                f"input_blocks.{index}.0.{_resnet(rest)}"
                if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}"
            ] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = stride * block + layer
            out[
                f"output_blocks.{index}.0.{_resnet(rest)}"
                if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}"
            ] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            slot = 2 if block in up_with_attention else 1
            out[f"output_blocks.{stride * block + layers_per_block}.{slot}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM names (without the prefix).

    LDM numbers the decoder's up blocks from the lowest resolution's end backwards, names the
    mid block's layers ``block_1, attn_1, block_2``, and stores the mid attention's q, k, v and
    output projections as 1x1 convolutions ``[c, c, 1, 1]`` where diffusers has linears ``[c, c]``.
    """
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            out[f"{m[1]}.norm_out.{m[2]}"] = value
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
            out[key] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = num_blocks - 1 - int(m[1])
            out[f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
            out[f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
    return out


def to_ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """One LDM single-file state dict, as SD1.5 checkpoints store it (fp32 here)."""
    state = {
        UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()
    }
    state |= {
        VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), len(vae.config.down_block_types)).items()
    }
    state |= {
        f"{TEXT_PREFIX}text_model.{k.removeprefix('text_model.')}": v
        for k, v in text_encoder.state_dict().items()
    }
    # Real SD1.5 files also carry the CLIP position ids and the training noise schedule.
    positions = text_encoder.config.max_position_embeddings
    state[f"{TEXT_PREFIX}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return {k: v.detach().contiguous() for k, v in state.items()}


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
    state = to_ldm_state_dict(*tiny_sd15_models(config_dir, seed))
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        save_file(state, path)
    return path


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
