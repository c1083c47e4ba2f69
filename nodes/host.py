"""What the nodes need from ComfyUI, in one place.

Inside ComfyUI the host's modules decide devices, report progress, draw latent previews and
signal cancellation. Outside it (the test suite, scripts) the same calls fall back to plain
torch behaviour: CUDA when available, no progress bar, never cancelled.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from lookback_core.precision import DTYPES, dtype_named

try:
    import comfy.model_management as model_management
    import comfy.utils
    import folder_paths
    import latent_preview
    from comfy import latent_formats
except ImportError:  # not running inside ComfyUI
    model_management = None

IN_COMFYUI = model_management is not None
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


def compute_device() -> torch.device:
    if IN_COMFYUI:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    return model_management.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """fp16/bf16/fp32 as asked; ``auto`` is ComfyUI's choice on GPUs and fp32 on CPUs."""
    if precision != "auto":
        return dtype_named(precision)
    if device.type == "cpu":
        return torch.float32
    if IN_COMFYUI:
        return model_management.unet_dtype(
            device, supported_dtypes=[DTYPES["fp16"], DTYPES["bf16"], DTYPES["fp32"]]
        )
    return torch.float16


def make_room(device: torch.device, bytes_needed: int) -> None:
    """Ask ComfyUI to unload other models until ``bytes_needed`` fit on ``device``."""
    if IN_COMFYUI and device.type != "cpu":
        model_management.free_memory(bytes_needed, device)


def release(device: torch.device) -> None:
    if IN_COMFYUI:
        model_management.soft_empty_cache()


def cancel_requested() -> bool:
    """Checked between sampling steps. Inside ComfyUI a pressed Cancel raises the host's own
    interrupt exception, so the queue reports the run as interrupted rather than failed."""
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()
    return False


def progress_reporter(total: int, device: torch.device) -> Callable[[int, int, torch.Tensor], None] | None:
    """A step callback that moves ComfyUI's progress bar and previews the newest frame."""
    if not IN_COMFYUI:
        return None
    bar = comfy.utils.ProgressBar(total)
    previewer = latent_preview.get_previewer(device, latent_formats.SD15())

    def report(step: int, steps: int, latents: torch.Tensor) -> None:
        preview = None
        if previewer is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", latents[:1, :, -1])
        bar.update_absolute(step, steps, preview)

    return report


def metadata_disabled() -> bool:
    """ComfyUI's ``--disable-metadata``: then no workflow is embedded in outputs."""
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import args

    return bool(args.disable_metadata)
