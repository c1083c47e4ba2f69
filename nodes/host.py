"""What the nodes need from ComfyUI, in one place.

Inside ComfyUI: model folders, the output folder, the model patcher and its wrapper kinds.
Outside it (the test suite, scripts) the folder calls fall back to plain paths.
"""

from __future__ import annotations

import os

import torch

try:
    import comfy.model_patcher
    import folder_paths
except ImportError:  # not running inside ComfyUI
    folder_paths = None

IN_COMFYUI = folder_paths is not None
TESTED_COMFYUI = "0.33.0"  # the ComfyUI release the pack is tested against (tests/test_comfyui_*.py)
# comfy.patcher_extension.WrappersMP's names of the two wrapper kinds the pack uses
SAMPLER_SAMPLE = "sampler_sample"
PREDICT_NOISE = "predict_noise"
# the UNet's patch points the look-back modules use (transformer_options["patches"] keys)
MIDDLE_BLOCK_PATCH = "middle_block_after_patch"
UNET_PATCH_POINTS = (
    "input_block_patch",
    MIDDLE_BLOCK_PATCH,
    "output_block_patch",
    "forward_timestep_embed_patch",
)
# the ModelPatcher methods Apply Look-Back calls
PATCHER_METHODS = (
    "clone", "set_model_input_block_patch", "set_model_patch", "set_model_output_block_patch",
    "add_object_patch", "get_model_object", "set_model_forward_timestep_embed_patch",
    "set_additional_models", "get_additional_models_with_key", "add_wrapper_with_key",
)  # fmt: skip


def missing_host_features() -> list[str]:
    """What the pack relies on that this ComfyUI lacks (empty when it has it all)."""
    import inspect

    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.patcher_extension
    import comfy.sd1_clip

    missing = [
        f"ModelPatcher.{name}"
        for name in PATCHER_METHODS
        if not hasattr(comfy.model_patcher.ModelPatcher, name)
    ]
    wrappers = getattr(comfy.patcher_extension, "WrappersMP", None)
    for attribute, name in (("SAMPLER_SAMPLE", SAMPLER_SAMPLE), ("PREDICT_NOISE", PREDICT_NOISE)):
        if getattr(wrappers, attribute, None) != name:
            missing.append(f"the {name!r} wrapper (comfy.patcher_extension.WrappersMP.{attribute})")
    unet_source = inspect.getsource(openaimodel)
    missing += [
        f"the UNet patch point {name!r}" for name in UNET_PATCH_POINTS if f'"{name}"' not in unet_source
    ]
    if "_model_config" not in inspect.getsource(comfy.sd1_clip.SDClipModel.__init__):
        missing.append("text model config overrides (model_options['clip_l_model_config'])")
    return missing


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
