"""Write diffusers SD1.5 models as an original LDM single-file checkpoint.

The mapping is the inverse of what diffusers' single-file converter does, written
independently, so a round trip through :func:`lookback_core.sd15.load_sd15` checks both.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from .atomic import atomic_path, save_safetensors
from .checkpoint_file import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, read_checkpoint
from .sd15 import embedded_configs_metadata

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


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The CLIP text tower's keys as SD1.5 files store them (after ``TEXT_PREFIX``), with its
    position ids, which real SD1.5 files carry and recent ``transformers`` no longer saves."""
    state = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in text_encoder.state_dict().items()}
    positions = text_encoder.config.max_position_embeddings
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return state


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
    state |= {TEXT_PREFIX + k: v for k, v in text_encoder_to_ldm(text_encoder).items()}
    # Real SD1.5 files also carry the training noise schedule.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_ldm_checkpoint(
    path: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    *,
    embed_configs: bool = False,
    scheduler_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the three models as one LDM checkpoint; ``.ckpt`` as ``{"state_dict": ...}``, else safetensors.

    ``embed_configs`` stores the models' configs (and ``scheduler_config``, if the UNet was not
    trained with SD1.5's) in the safetensors metadata, so the file loads with no config folder
    (for SD1.5 architectures at other sizes); ``metadata`` adds entries.
    Floating-point weights are stored as ``dtype``. Safetensors files are written atomically.
    """
    path = Path(path)
    state = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in to_ldm_state_dict(unet, vae, text_encoder).items()
    }
    if path.suffix == ".ckpt":
        if embed_configs or metadata or scheduler_config:
            raise ValueError(f"{path}: metadata and embedded configs need a .safetensors file")
        with atomic_path(path) as partial:
            torch.save({"state_dict": state, "global_step": 0}, partial)
        return path
    header = dict(metadata or {})
    if embed_configs:
        header |= embedded_configs_metadata(unet, vae, text_encoder, scheduler_config)
    return save_safetensors(state, path, header)


def replace_unet(
    source: str | Path,
    unet: UNet2DConditionModel,
    path: str | Path,
    text_encoder: CLIPTextModel | None = None,
) -> Path:
    """Write the SD1.5 checkpoint ``source`` with its UNet replaced by ``unet`` (and, if given, its
    text encoder by ``text_encoder``), as safetensors at ``path``.

    Everything else (VAE, metadata such as embedded configs) is copied as it is; each replaced
    part is stored in the dtype the source stores it in.
    """
    parts = {UNET_PREFIX: unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)}
    if text_encoder is not None:
        parts[TEXT_PREFIX] = text_encoder_to_ldm(text_encoder)
    return _replace_parts(source, parts, path)


def replace_vae(source: str | Path, vae: AutoencoderKL, path: str | Path) -> Path:
    """:func:`replace_unet` for the VAE: ``source`` with its VAE replaced by ``vae``."""
    return _replace_parts(
        source, {VAE_PREFIX: vae_to_ldm(vae.state_dict(), len(vae.config.down_block_types))}, path
    )


def _replace_parts(source: str | Path, parts: dict[str, dict[str, torch.Tensor]], path: str | Path) -> Path:
    """``source`` with the keys under each prefix of ``parts`` replaced by that part's tensors."""
    state, metadata = read_checkpoint(Path(source))
    for prefix, part in parts.items():
        dtype = next(v.dtype for k, v in state.items() if k.startswith(prefix) and v.is_floating_point())
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state |= {
            prefix + k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in part.items()
        }
    return save_safetensors(state, path, metadata)
