"""What the nodes need from ComfyUI, in one place.

Inside ComfyUI: model folders, the output folder, the model patcher and its wrapper kinds, the core
VIDEO type.
Outside it (the test suite, scripts) the folder calls fall back to plain paths.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

from .lookback_patch import (
    UNET_PATCH_POINTS,
    LookBackPatches,
    add_patches,
    frame_grid,
    site_patch_point,
    unet_site_channels,
)

try:
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
    import latent_preview
except ImportError:  # not running inside ComfyUI
    folder_paths = None

IN_COMFYUI = folder_paths is not None
TESTED_COMFYUI = "0.33.0"  # the ComfyUI release the pack is tested against (tests/test_comfyui_*.py)
# comfy.patcher_extension.WrappersMP's names of the two wrapper kinds the pack uses
SAMPLER_SAMPLE = "sampler_sample"
PREDICT_NOISE = "predict_noise"
# the ModelPatcher methods Apply Look-Back calls
PATCHER_METHODS = (
    "clone", "set_model_input_block_patch", "set_model_patch", "set_model_output_block_patch",
    "add_object_patch", "get_model_object", "set_model_forward_timestep_embed_patch",
    "set_additional_models", "get_additional_models_with_key", "add_wrapper_with_key",
)  # fmt: skip
# ComfyUI's own UNet class at SD1.5's layout (4 levels of 2 res blocks, cross-attention in the first
# 3) and 32 channels (one GroupNorm group each): what the host check runs once, patched as the pack patches
PROBE_UNET = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, channel_mult=(1, 1, 1, 1),
    transformer_depth=[1] * 6 + [0] * 2, transformer_depth_middle=1, transformer_depth_output=[1] * 9 + [0] * 3,
    use_spatial_transformer=True, context_dim=32, num_heads=1,
)  # fmt: skip
# a text model config override (the own-config loader's), small enough to build in no time
PROBE_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_attention_heads": 1,
    "num_hidden_layers": 1,
}


class _SiteRecorder(LookBackPatches):
    """The pack's patch functions, recording the site each would apply a module at instead of applying one."""

    def __init__(self) -> None:
        super().__init__(temporal=None)
        self.sites: list[str] = []

    def apply(self, site: str, h: torch.Tensor, options: dict) -> torch.Tensor:
        self.sites.append(site)
        return h


@functools.cache
def unet_patch_problems() -> tuple[str, ...]:
    """The UNet patch points that do not do what the pack needs, found by use: a small ComfyUI UNet of
    SD1.5's layout, patched as Apply Look-Back patches a MODEL, runs once, and every look-back site
    must be reached exactly once. Empty when all work; run once per process."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    unet = openaimodel.UNetModel(**PROBE_UNET)
    with torch.no_grad():  # ComfyUI's layers leave their weights uninitialised
        for parameter in unet.parameters():
            parameter.zero_()
    model = torch.nn.Module()
    model.diffusion_model = unet  # where a ComfyUI model keeps its UNet (comfy.model_base.BaseModel)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    recorder = _SiteRecorder()
    blocks = len(unet.output_blocks)
    add_patches(patcher, recorder, blocks)
    # ComfyUI puts the object patch in place when it loads the model
    unet.output_blocks[blocks - 1] = patcher.get_model_object(f"diffusion_model.output_blocks.{blocks - 1}")
    options = dict(patcher.model_options["transformer_options"])
    try:
        with torch.no_grad():
            unet(
                torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, 1, 32), transformer_options=options
            )
    except Exception as error:  # whatever a changed UNet raises, the pack cannot ride on it
        return (f"a UNet that runs the pack's patches ({type(error).__name__}: {error})",)
    reached = Counter(recorder.sites)
    broken = {site_patch_point(site, blocks) for site in unet_site_channels(PROBE_UNET) if reached[site] != 1}
    return tuple(f"the UNet patch point {name!r}" for name in UNET_PATCH_POINTS if name in broken)


@functools.cache
def text_config_problems() -> tuple[str, ...]:
    """Whether ComfyUI builds SD1.5's text model from a config override, as the own-config loader
    asks (``model_options['clip_l_model_config']``), found by building a small one; run once per process."""
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", model_options={"clip_l_model_config": PROBE_TEXT_CONFIG})
    if clip.clip_l.num_layers == PROBE_TEXT_CONFIG["num_hidden_layers"]:
        return ()
    return ("text model config overrides (model_options['clip_l_model_config'])",)


def missing_host_features() -> list[str]:
    """What the pack relies on that this ComfyUI lacks (empty when it has it all)."""
    import comfy.patcher_extension

    missing = [
        f"ModelPatcher.{name}"
        for name in PATCHER_METHODS
        if not hasattr(comfy.model_patcher.ModelPatcher, name)
    ]
    wrappers = getattr(comfy.patcher_extension, "WrappersMP", None)
    for attribute, name in (("SAMPLER_SAMPLE", SAMPLER_SAMPLE), ("PREDICT_NOISE", PREDICT_NOISE)):
        if getattr(wrappers, attribute, None) != name:
            missing.append(f"the {name!r} wrapper (comfy.patcher_extension.WrappersMP.{attribute})")
    if not missing:  # the patches are placed with the patcher's methods
        missing += unet_patch_problems()
    return [*missing, *text_config_problems()]


def check_host() -> None:
    """Refuse to load into a ComfyUI that lacks what the pack relies on, naming it and the release needed."""
    missing = missing_host_features()
    if missing:
        raise RuntimeError(
            f"Look-Back I2V needs ComfyUI {TESTED_COMFYUI} or newer (the release it is tested with); this "
            f"ComfyUI lacks {'; '.join(missing)}. Update ComfyUI."
        )


LOOKBACK_FOLDER = "lookback"
# checkpoints that carry their own configs: the pack's toy checkpoint and ComfyUI's checkpoint folders
OWN_CONFIG_CHECKPOINTS_FOLDER = "lookback_checkpoints"


def _safetensors_folder(name: str, paths: list[str]) -> None:
    for path in paths:
        folder_paths.add_model_folder_path(name, path)
    folder_paths.folder_names_and_paths[name] = (
        folder_paths.folder_names_and_paths[name][0],
        {".safetensors"},
    )


def register_model_folders() -> None:
    """``models/lookback`` for temporal weights (extra_model_paths.yaml may add more folders), and the
    pack's shipped toy files, listed after the user's own."""
    if not IN_COMFYUI:
        return
    from toyworld.model import TOY_CHECKPOINT_DIR, TOY_WEIGHTS_DIR

    folder_paths.add_model_folder_path(
        LOOKBACK_FOLDER, os.path.join(folder_paths.models_dir, LOOKBACK_FOLDER), True
    )
    _safetensors_folder(LOOKBACK_FOLDER, [str(TOY_WEIGHTS_DIR)])
    os.makedirs(folder_paths.get_folder_paths(LOOKBACK_FOLDER)[0], exist_ok=True)
    _safetensors_folder(
        OWN_CONFIG_CHECKPOINTS_FOLDER,
        [*folder_paths.get_folder_paths("checkpoints"), str(TOY_CHECKPOINT_DIR)],
    )


def model_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder) if IN_COMFYUI else []


def model_path(folder: str, name: str) -> str:
    if IN_COMFYUI:
        return folder_paths.get_full_path_or_raise(folder, name)
    return name


def output_directory() -> str:
    if IN_COMFYUI:
        return folder_paths.get_output_directory()
    return os.path.abspath("output")


def companion_model(module: torch.nn.Module, model):
    """``module`` as a ComfyUI model that loads and offloads with the MODEL ``model`` (its
    memory counted by ComfyUI's model management)."""
    return comfy.model_patcher.ModelPatcher(
        module, load_device=model.load_device, offload_device=model.offload_device
    )


def core_video(images: torch.Tensor, frame_rate: float) -> object | None:
    """IMAGE frames ``[n, h, w, 3]`` at ``frame_rate`` as ComfyUI's core ``VIDEO`` (what Create Video
    makes, for Save Video, Get Video Components and every node that takes a ``VIDEO``), through
    ComfyUI's public ``comfy_api``; ``None`` outside ComfyUI."""
    if not IN_COMFYUI:
        return None
    from comfy_api.latest import InputImpl, Types

    # to the millisecond, as ComfyUI's encoder rounds it
    rate = Fraction(round(frame_rate * 1000), 1000)
    return InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=rate))


def show_on_node(text: str, node_id: str | None) -> None:
    """``text`` under the node in ComfyUI's canvas (as its own nodes report sizes); a no-op outside."""
    if IN_COMFYUI and node_id is not None:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)


def metadata_disabled() -> bool:
    """ComfyUI's ``--disable-metadata``: then no workflow is embedded in outputs."""
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import args

    return bool(args.disable_metadata)


def every_frame_preview(callback: Callable, guider: Any) -> Callable:
    """KSampler's step ``callback(step, x0, x, total_steps)``, followed by a live preview of every frame.

    ComfyUI's previewers (latent2rgb, TAESD) decode the first latent of the batch, which for a
    look-back video (its frames are the batch) is the pinned start frame, the one frame that never
    changes. The host's callback still runs as it is (its progress, and the denoised latent it
    keeps for SamplerCustom's ``denoised_output``); then the same previewer, the one the user's
    ``--preview-method`` selects, decodes all frames as a grid (:func:`frame_grid`) and the grid is
    sent as the node's preview through ``comfy.utils.ProgressBar``, after the host's own (the
    frontend shows the latest). With previews off nothing more is done.
    """
    patcher = guider.model_patcher
    previewer = latent_preview.get_previewer(patcher.load_device, patcher.model.latent_format)
    if previewer is None:
        return callback
    progress = comfy.utils.ProgressBar(1)

    def step(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        callback(step, x0, x, total_steps)
        picture = previewer.decode_latent_to_preview_image("JPEG", frame_grid(x0))
        progress.update_absolute(step + 1, total_steps, picture)

    return step
