"""Video files for the data and trainer tests, cut from toy-world clips (any length, square size <= 64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookback_core.video_io import write_video
from toyworld import world
from training.data import VideoClipDataset, clip_items
from training.dataset_config import DatasetSpec


def toy_frames(seed: int, frames: int = world.FRAMES, size: int = world.SIZE) -> np.ndarray:
    """``frames`` frames ``[f, size, size, 3]``: clip ``seed`` followed by the next seeds' clips, cropped."""
    clips = [world.make_clip(seed + i).frames for i in range(-(-frames // world.FRAMES))]
    return np.concatenate(clips)[:frames, :size, :size]


def write_toy_videos(folder: Path, count: int, *, frames: int = world.FRAMES, size: int = world.SIZE) -> Path:
    """``clip_000.mp4`` ... with same-name captions: the trainer's video-folder layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        write_video(toy_frames(seed, frames, size), folder / f"clip_{seed:03d}.mp4", fps=world.FPS)
        (folder / f"clip_{seed:03d}.txt").write_text(world.make_clip(seed).caption + "\n")
    return folder


def shaped_frames(seed: int, width: int, height: int, frames: int) -> np.ndarray:
    """``frames`` toy frames ``[f, height, width, 3]`` of any size: each scaled up by a whole factor
    until it covers the size, then cropped."""
    factor = -(-max(width, height) // world.SIZE)
    big = toy_frames(seed, frames).repeat(factor, axis=1).repeat(factor, axis=2)
    return np.ascontiguousarray(big[:, :height, :width])


def square_dataset(
    root: Path, csv: Path | None = None, *, num_frames: int = 4, stride: int = 2, resolution: int = 32,
    reference_fps: float | None = None,
) -> VideoClipDataset:  # fmt: skip
    """The dataset the trainer's data flags make of ``root``: square clips, no buckets."""
    spec = DatasetSpec(
        path=str(root), csv=None if csv is None else str(csv), resolution=(resolution,), num_frames=(num_frames,),
        frame_stride=stride, reference_fps=reference_fps, buckets=False,
    )  # fmt: skip
    items, left_out = clip_items([spec])
    assert left_out == []  # a square dataset is not sized: nothing is left out before reading
    return VideoClipDataset(items)
