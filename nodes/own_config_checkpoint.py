"""Load Checkpoint for SD1.5-architecture checkpoints that carry their own configs (the toy model).

ComfyUI's Load Checkpoint recognises SD1.5 by its sizes (320 model channels, a 768-wide text
context), so a checkpoint of the same architecture at other sizes ("Could not detect model
type") cannot enter it. Such a checkpoint carries its diffusers configs in its metadata
(``lookback_core.sd15.EMBEDDED_CONFIGS_KEY``); this loader reads them, translates them to
ComfyUI's own terms (:func:`comfy_settings`: the UNet's heads, the VAE's ``ddconfig``, the text
tower's sizes, the latent scale, the noise schedule and prediction type), and builds ComfyUI's
own classes: ``BaseModel`` through its SD1.5 supported-model config, ``comfy.sd.VAE`` and
``comfy.sd.CLIP``, each under a model patcher. Everything downstream (Apply Look-Back, KSampler,
LoRA, previews, model management) is then ComfyUI's own.

What ComfyUI's classes cannot compute is refused, by file and field, before any model is built:
ComfyUI builds every GroupNorm with 32 groups, so a model with another count would load
without an error and compute something else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

from lookback_core.checkpoint_file import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    checkpoint_metadata,
    part_elements,
    read_checkpoint,
)
from lookback_core.latents import latent_scale
from lookback_core.metadata import init_defaults
from lookback_core.sd15 import EMBEDDED_CONFIGS_KEY, ModelConfigs

from . import host
from .native import CATEGORY

COMFY_NORM_GROUPS = 32  # GroupNorm(32, ...) in ComfyUI's UNet and VAE code
# Config values ComfyUI's classes compute the same way as diffusers'/transformers' (field: allowed)
_UNET_NEEDS: dict[str, tuple[Any, ...]] = {
    "norm_num_groups": (COMFY_NORM_GROUPS,),
    "norm_eps": (1e-5,),
    "act_fn": ("silu",),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}
_VAE_NEEDS: dict[str, tuple[Any, ...]] = {
    "norm_num_groups": (COMFY_NORM_GROUPS,),
    "act_fn": ("silu",),
    "mid_block_add_attention": (True,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "shift_factor": (None,),
}
_TEXT_NEEDS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("quick_gelu", "gelu"),
    "layer_norm_eps": (1e-5,),
    "max_position_embeddings": (77,),
}
_SCHEDULER_NEEDS: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("scaled_linear",),
    "num_train_timesteps": (1000,),
    "prediction_type": ("epsilon", "v_prediction"),
    "rescale_betas_zero_snr": (False,),
}


@dataclass(frozen=True)
class ComfySettings:
    """A checkpoint's configs in ComfyUI's terms."""

    num_heads: int  # the UNet's attention heads (diffusers calls them attention_head_dim)
    latent_scale: float  # ComfyUI's latent format scale_factor: the VAE's scaling factor
    prediction_type: str  # "epsilon" or "v_prediction"
    sampling_settings: dict[str, float]  # ComfyUI's beta schedule ("linear" there is SD's scaled linear)
    vae_ddconfig: dict[str, Any]
    text_config: dict[str, Any]  # overrides of ComfyUI's CLIP-L text config


def _problems(
    part: str, config: Mapping[str, Any], needs: Mapping[str, tuple[Any, ...]], defaults: Mapping[str, Any]
) -> list[str]:
    problems = []
    for field, allowed in needs.items():
        value = config.get(field, defaults.get(field))
        if value not in allowed:
            wanted = " or ".join(repr(a) for a in allowed)
            problems.append(f"{part} {field} is {value!r}, ComfyUI's classes compute {wanted}")
    return problems


def comfy_settings(path: Path, configs: ModelConfigs) -> ComfySettings:
    """Translate ``configs`` (diffusers/transformers) to ComfyUI's; :class:`CheckpointError` names
    every field ComfyUI's SD1.5 classes cannot compute as the configs say."""
    # every field as the model is built with it: the config's value, else the class's default (the
    # values themselves were checked when the configs were read, lookback_core.metadata)
    unet = {**init_defaults(UNet2DConditionModel), **configs.configs["unet"]}
    vae = {**init_defaults(AutoencoderKL), **configs.configs["vae"]}
    text = {**CLIPTextConfig().to_dict(), **configs.configs["text_encoder"]}
    scheduler = {**init_defaults(DDPMScheduler), **configs.scheduler}
    problems = _problems("the UNet's", unet, _UNET_NEEDS, {})
    problems += _problems("the VAE's", vae, _VAE_NEEDS, {})
    problems += _problems("the text encoder's", text, _TEXT_NEEDS, {})
    problems += _problems("the scheduler's", scheduler, _SCHEDULER_NEEDS, {})
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim")
    if not isinstance(heads, int):
        problems.append(
            f"the UNet's attention_head_dim is {heads!r}; one head count for every block is needed"
        )
    widths = list(vae.get("block_out_channels", ()))
    if not widths or any(w % widths[0] for w in widths):
        problems.append(
            f"the VAE's block_out_channels {widths} are not multiples of the first (ComfyUI's ch_mult)"
        )
    if problems:
        raise CheckpointError(f"{path}: cannot be built from ComfyUI's SD1.5 classes: " + "; ".join(problems))
    return ComfySettings(
        num_heads=heads,
        latent_scale=latent_scale(vae),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        sampling_settings={"linear_start": scheduler["beta_start"], "linear_end": scheduler["beta_end"]},
        vae_ddconfig={
            "double_z": True,
            "z_channels": vae["latent_channels"],
            "resolution": vae["sample_size"],
            "in_channels": vae["in_channels"],
            "out_ch": vae["out_channels"],
            "ch": widths[0],
            "ch_mult": [w // widths[0] for w in widths],
            "num_res_blocks": vae["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },  # fmt: skip
        text_config={
            k: text[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_hidden_layers",
                "hidden_act",
                "vocab_size",
                "projection_dim",
                "eos_token_id",
            )
            if k in text
        },  # fmt: skip
    )


@functools.lru_cache(maxsize=256)
def _carries_configs(path: str, _mtime_ns: int, _size: int) -> bool:
    try:
        return EMBEDDED_CONFIGS_KEY in checkpoint_metadata(Path(path))
    except (CheckpointError, OSError):
        return False


def carries_own_configs(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors checkpoint with embedded configs (its header only is read)."""
    if not str(path).lower().endswith(".safetensors"):
        return False
    stat = os.stat(path)
    return _carries_configs(os.fspath(path), stat.st_mtime_ns, stat.st_size)


def _keys_check(path: Path, what: str, built: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Every weight ComfyUI's model has comes from the file, and every file weight has a place."""
    missing = sorted(set(built) - set(given))
    extra = sorted(set(given) - set(built))
    if missing or extra:
        raise CheckpointError(
            f"{path}: ComfyUI's {what} does not take this file's weights: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} without a place (e.g. {extra[:3]})"
        )


def load_own_config_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """MODEL, CLIP and VAE of ``path`` as ComfyUI's own objects (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)."""
    path = Path(path)
    state, metadata = read_checkpoint(path)  # other families, damaged files and NaNs refused by name
    if EMBEDDED_CONFIGS_KEY not in metadata:
        raise CheckpointError(
            f"{path}: carries no model configs (safetensors metadata {EMBEDDED_CONFIGS_KEY!r}); load a "
            "full-size SD1.5 checkpoint with ComfyUI's Load Checkpoint instead"
        )
    # every field checked, and the models they describe sized against what the file holds, before any is built
    configs = ModelConfigs.from_metadata(path, metadata[EMBEDDED_CONFIGS_KEY], part_elements(state))
    settings = comfy_settings(path, configs)
    try:
        return _build(path, state, settings)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"{path}: ComfyUI's SD1.5 classes cannot take this file's weights with the configs it carries "
            f"({type(err).__name__}: {str(err)[:500]})"
        ) from None


def _build(path: Path, state: dict, settings: ComfySettings) -> tuple[Any, Any, Any]:
    """ComfyUI's MODEL, CLIP and VAE of ``state`` as ``settings`` describe them."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    unet_config = comfy.model_detection.detect_unet_config(state, UNET_PREFIX)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.unet_config["num_heads"] = settings.num_heads
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=settings.latent_scale)
    model_config.sampling_settings = dict(settings.sampling_settings)
    load_device = comfy.model_management.get_torch_device()
    unet_dtype = comfy.model_management.unet_dtype(supported_dtypes=model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(
        unet_dtype, comfy.model_management.unet_manual_cast(unet_dtype, load_device), device=load_device
    )
    model_type = (
        comfy.model_base.ModelType.V_PREDICTION
        if settings.prediction_type == "v_prediction"
        else comfy.model_base.ModelType.EPS
    )
    model = comfy.model_base.BaseModel(model_config, model_type=model_type, device="cpu")
    unet_state = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    _keys_check(path, "UNet", model.diffusion_model.state_dict(), unet_state)
    model.load_model_weights(state, UNET_PREFIX)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )

    vae_state = comfy.utils.state_dict_prefix_replace(state, {VAE_PREFIX: ""}, filter_keys=True)
    vae = comfy.sd.VAE(
        sd=vae_state, config={"params": {"ddconfig": settings.vae_ddconfig, "embed_dim": settings.vae_ddconfig["z_channels"]}}
    )  # fmt: skip
    _keys_check(path, "VAE", vae.first_stage_model.state_dict(), vae_state)

    clip_state = model_config.process_clip_state_dict(
        {k: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    )
    clip = comfy.sd.CLIP(
        model_config.clip_target(),
        tokenizer_data=clip_state,
        parameters=comfy.utils.calculate_parameters(clip_state),
        state_dict=clip_state,
        model_options={"clip_l_model_config": settings.text_config},
    )
    built = {
        f"clip_l.{k}": v
        for k, v in clip.cond_stage_model.clip_l.state_dict().items()
        if not k.endswith(("logit_scale", "text_projection.weight"))  # kept out of SD1.5 files
    }
    _keys_check(
        path, "CLIP text encoder", built, {k: v for k, v in clip_state.items() if "position_ids" not in k}
    )
    return patcher, clip, vae


def checkpoint_names() -> list[str]:
    """The files of ComfyUI's checkpoint folders that carry their own configs, then the pack's toy."""
    folder = host.OWN_CONFIG_CHECKPOINTS_FOLDER
    return [name for name in host.model_files(folder) if carries_own_configs(host.model_path(folder, name))]


class LookBackCheckpointLoader:
    """Load Checkpoint for SD1.5-architecture checkpoints that carry their own configs (the toy model)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a checkpoint of the SD1.5 architecture at other sizes, such as the pack's toy model, "
        "from the configs it carries, into ComfyUI's own MODEL, CLIP and VAE. Full-size SD1.5 "
        "checkpoints load with ComfyUI's Load Checkpoint."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ckpt_name": (
                    checkpoint_names(),
                    {
                        "tooltip": "Checkpoints (models/checkpoints and the pack's toy) that carry their own configs."
                    },
                )
            }
        }

    def load(self, ckpt_name: str) -> tuple:
        return load_own_config_checkpoint(host.model_path(host.OWN_CONFIG_CHECKPOINTS_FOLDER, ckpt_name))
