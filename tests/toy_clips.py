"""Video files for the data and trainer tests, cut from toy-world clips (any length, square size <= 64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookback_core.video_io import write_video
from toyworld import world


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
