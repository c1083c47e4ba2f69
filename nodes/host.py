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
# comfy.patcher_extension.WrappersMP's names of the two wrapper kinds the pack uses
SAMPLER_SAMPLE = "sampler_sample"
PREDICT_NOISE = "predict_noise"
LOOKBACK_FOLDER = "lookback"


def register_model_folder() -> None:
    """``models/lookback`` for temporal weights; extra_model_paths.yaml may add more folders."""
    if not IN_COMFYUI:
        return
    folder_paths.add_model_folder_path(
        LOOKBACK_FOLDER, os.path.join(folder_paths.models_dir, LOOKBACK_FOLDER), True
    )
    paths, _ = folder_paths.folder_names_and_paths[LOOKBACK_FOLDER]
    folder_paths.folder_names_and_paths[LOOKBACK_FOLDER] = (paths, {".safetensors"})
    os.makedirs(paths[0], exist_ok=True)


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
