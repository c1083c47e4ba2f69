"""``python -m lookback_core demo``: the whole job offline, on a generated tiny model.

1. a tiny SD1.5-architecture checkpoint in the LDM single-file format (random weights);
2. a small synthetic video set (coloured squares moving over gradients, with captions);
3. look-back weights trained on it by ``training/train.py``, as a user would run it;
4. a video from the first frame of a held-out clip, through the same code as the CLI.

A random base model draws no pictures, so the video shows texture, not squares: the demo proves
that every piece runs and fits together on this machine, in a minute or two on a CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .video_io import write_video

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40)}


def synthetic_clip(seed: int, frames: int = 16, size: int = 64) -> tuple[np.ndarray, str]:
    """A square of one colour moving in a straight line over a gradient; returns (frames, caption)."""
    rng = np.random.default_rng(seed)
    name, colour = list(COLOURS.items())[seed % len(COLOURS)]
    ys, xs = np.mgrid[0:size, 0:size] / size
    background = np.stack([xs, ys, 1 - xs], -1) * rng.uniform(60, 160, size=3)
    side = size // 4
    start = rng.uniform(0, size - side, size=2)
    velocity = rng.uniform(-2.5, 2.5, size=2)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        frame = background.copy()
        y, x = (start + velocity * i).clip(0, size - side).astype(int)
        frame[y : y + side, x : x + side] = colour
        video[i] = frame.astype(np.uint8)
    direction = "right" if velocity[1] > 0 else "left"
    return video, f"a {name} square moving {direction}"


def write_synthetic_dataset(folder: Path, count: int, *, frames: int = 16, size: int = 64) -> Path:
    """``count`` mp4 clips with same-name ``.txt`` captions: the video-folder layout of the trainer."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        video, caption = synthetic_clip(seed, frames, size)
        write_video(video, folder / f"clip_{seed:03d}.mp4", fps=8)
        (folder / f"clip_{seed:03d}.txt").write_text(caption + "\n")
    return folder


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def run_demo(out: Path, *, steps: int = 30, frames: int = 8) -> Path:
    """Run the four stages into ``out``; returns the generated video's path."""
    from .tiny import tiny_config_dir, write_tiny_sd15_checkpoint

    train_script = REPO / "training" / "train.py"
    if not train_script.is_file():
        raise FileNotFoundError(f"the demo runs {train_script}, which this installation does not have")
    out = out.resolve()
    config_dir = tiny_config_dir(out)
    checkpoint = write_tiny_sd15_checkpoint(out / "tiny_sd15.safetensors", config_dir=config_dir)
    data = write_synthetic_dataset(out / "videos", 12)
    held_out, caption = synthetic_clip(1000)
    start = out / "start.png"
    iio.imwrite(start, held_out[0])
    train_dir = out / "training"
    _run(
        [
            sys.executable, str(train_script),
            "--pretrained_model", str(checkpoint),
            "--config_dir", str(config_dir),
            "--train_data_dir", str(data),
            "--output_dir", str(train_dir),
            "--preset", "light",
            "--resolution", "64",
            "--num_frames", str(frames),
            "--frame_stride", "1",
            "--train_batch_size", "2",
            "--gradient_accumulation_steps", "1",
            "--max_train_steps", str(steps),
            "--checkpointing_steps", str(steps),
            "--seed", "0",
        ]
    )  # fmt: skip
    video = out / "video.mp4"
    _run(
        [
            sys.executable, "-m", "lookback_core", "generate",
            "--checkpoint", str(checkpoint),
            "--config-dir", str(config_dir),
            "--weights", str(train_dir / "lookback_weights.safetensors"),
            "--image", str(start),
            "--prompt", caption,
            "--frames", str(frames),
            "--steps", "10",
            "--out", str(video),
        ]
    )  # fmt: skip
    return video
