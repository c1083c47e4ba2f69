"""Look-Back Video Combine: IMAGE frames to an mp4/gif/webp in the output folder, with a preview."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch

from lookback_core.video_io import write_video

from . import host
from .native import CATEGORY

FORMATS = {"video/h264-mp4": ".mp4", "image/gif": ".gif", "image/webp": ".webp"}


def next_free_path(folder: Path, prefix: str, suffix: str) -> Path:
    """``<folder>/<prefix>_00001<suffix>``, numbered past the files already there.

    The prefix is matched literally: ``[``, ``]``, ``*`` and ``?`` in it are not glob patterns."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p.stem[len(prefix) + 1 :] for p in folder.glob(f"{glob.escape(prefix)}_*{suffix}")]
    counter = max((int(t) for t in taken if t.isdigit()), default=0) + 1
    return folder / f"{prefix}_{counter:05d}{suffix}"


def workflow_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """The API prompt and the UI workflow, as ComfyUI embeds them in its own outputs."""
    metadata = {}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


def save_frames(
    images: torch.Tensor,
    output_dir: str | os.PathLike,
    filename_prefix: str,
    fmt: str,
    frame_rate: float,
    loop_count: int,
    metadata: dict[str, str],
) -> Path:
    """Write IMAGE frames ``[n, h, w, 3]`` as one video under ``output_dir``; returns its path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be an IMAGE batch [frames, h, w, 3], got shape {tuple(images.shape)}")
    subfolder, _, prefix = filename_prefix.replace("\\", "/").rpartition("/")
    folder = Path(output_dir) / subfolder
    if not folder.resolve().is_relative_to(Path(output_dir).resolve()):
        raise ValueError(f"filename_prefix {filename_prefix!r} points outside the output folder")
    path = next_free_path(folder, prefix or "LookBack", FORMATS[fmt])
    return write_video(images[..., :3], path, fps=frame_rate, loop=loop_count, metadata=metadata)


class LookBackVideoCombine:
    """Saves frames as a video and shows it in the UI."""

    CATEGORY = CATEGORY
    # outputs are appended, never reordered: saved workflows link them by position
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("filename", "video")
    OUTPUT_TOOLTIPS = (
        "The saved file's path.",
        "The frames and frame rate as ComfyUI's VIDEO, for Save Video, Get Video Components and other video nodes.",
    )
    OUTPUT_NODE = True
    FUNCTION = "combine"
    DESCRIPTION = (
        "Writes IMAGE frames as mp4 (H.264), gif or webp to the output folder, with the workflow embedded, "
        "and passes them on as a VIDEO."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The decoded frames, in order."}),
                "frame_rate": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.1, "tooltip": "Frames per second."}),
                "filename_prefix": ("STRING", {"default": "LookBack", "tooltip": "File name prefix; may hold a subfolder (videos/LookBack)."}),
                "format": (list(FORMATS), {"default": "video/h264-mp4", "tooltip": "mp4 for sharing, gif/webp for previews that loop anywhere."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "gif/webp loops; 0 loops forever."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }  # fmt: skip

    def combine(
        self, images: torch.Tensor, frame_rate: float, filename_prefix: str, format: str, loop_count: int,
        prompt: dict | None = None, extra_pnginfo: dict | None = None,
    ) -> dict:  # fmt: skip
        output_dir = host.output_directory()
        metadata = {} if host.metadata_disabled() else workflow_metadata(prompt, extra_pnginfo)
        path = save_frames(images, output_dir, filename_prefix, format, frame_rate, loop_count, metadata)
        subfolder = os.path.relpath(path.parent, output_dir)
        preview = {
            "filename": path.name,
            "subfolder": "" if subfolder == "." else subfolder,
            "type": "output",
        }
        video = host.core_video(images[..., :3], frame_rate)
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (str(path), video)}
