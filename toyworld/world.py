"""The toy world: one coloured shape moving in a straight line over a smooth background.

Small enough to train an SD1.5-architecture model on in an hour of CPU time, yet it asks the
look-back modules for exactly what the paper claims they give: keep the given image (frame 0)
and move its content over the following frames, in the direction the caption names.

A clip is ``FRAMES`` frames (or any length up to ``MAX_FRAMES``) of ``SIZE x SIZE`` RGB at ``FPS``:

- background: a linear gradient, at a random angle, between two random colours whose channels
  all lie in ``BACKGROUND_RANGE``;
- object: a square of side ``OBJECT_SIZE`` or a circle of that diameter, in one of
  :data:`COLOURS`, moving ``SPEED`` px per frame left, right, up or down, placed so it stays
  wholly inside the frame for the whole clip;
- caption: ``a {colour} {shape} moving {direction}``.

Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed names a clip. Training
uses seeds ``0..n-1``; held-out clips use seeds from :data:`HELD_OUT_SEED` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookback_core.video_io import write_video

SIZE = 64
FRAMES = 16
FPS = 8
OBJECT_SIZE = 16
SPEED = 2
# The longest clip whose object can stay wholly inside the frame at SPEED px per frame.
MAX_FRAMES = (SIZE - OBJECT_SIZE) // SPEED + 1
BACKGROUND_RANGE = (40, 160)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
}
SHAPES = ("square", "circle")
# Unit step (dy, dx) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
HELD_OUT_SEED = 1_000_000


@dataclass(frozen=True)
class ToyClip:
    """One clip of the world with the facts it was drawn from.

    ``frames``: ``[f, SIZE, SIZE, 3]`` uint8. ``positions``: ``[f, 2]`` top-left corner
    ``(y, x)`` of the object's bounding box in every frame.
    """

    seed: int
    frames: np.ndarray
    colour: str
    shape: str
    direction: str
    positions: np.ndarray

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


def caption(colour: str, shape: str, direction: str) -> str:
    """The world's caption, e.g. ``a red square moving left``."""
    return f"a {colour} {shape} moving {direction}"


def _background(rng: np.random.Generator) -> np.ndarray:
    low, high = BACKGROUND_RANGE
    start, end = rng.integers(low, high + 1, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    along = xs * np.cos(angle) + ys * np.sin(angle)
    t = (along - along.min()) / (along.max() - along.min())
    return start + t[..., None] * (end - start)


def object_footprint(shape: str) -> np.ndarray:
    """Boolean ``[OBJECT_SIZE, OBJECT_SIZE]`` mask of a square or a circle (pixel centres inside)."""
    if shape == "square":
        return np.ones((OBJECT_SIZE, OBJECT_SIZE), dtype=bool)
    if shape == "circle":
        centre = (OBJECT_SIZE - 1) / 2
        ys, xs = np.mgrid[0:OBJECT_SIZE, 0:OBJECT_SIZE]
        return (ys - centre) ** 2 + (xs - centre) ** 2 <= (OBJECT_SIZE / 2) ** 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_clip(seed: int, frames: int = FRAMES) -> ToyClip:
    """The clip named by ``seed`` (the same seed always gives the same clip), ``frames`` long
    (2..``MAX_FRAMES``). Longer clips start nearer the edge they move away from, so the object
    stays inside; the colour, shape, direction and background of a seed are the same at every
    length."""
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(
            f"a toy-world clip has 2 to {MAX_FRAMES} frames (the object must stay inside the frame), got {frames}"
        )
    rng = np.random.default_rng(seed)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    background = _background(rng)
    step = np.array(DIRECTIONS[direction]) * SPEED
    travel = step * (frames - 1)
    # Start positions that keep the object inside at frame 0 and at the last frame.
    low = np.maximum(0, -travel)
    high = SIZE - OBJECT_SIZE - np.maximum(0, travel)
    start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    positions = start + np.arange(frames)[:, None] * step
    footprint = object_footprint(shape)
    pixels = np.empty((frames, SIZE, SIZE, 3), dtype=np.uint8)
    for i, (y, x) in enumerate(positions):
        frame = background.copy()
        frame[y : y + OBJECT_SIZE, x : x + OBJECT_SIZE][footprint] = COLOURS[colour]
        pixels[i] = np.round(frame).astype(np.uint8)
    return ToyClip(seed, pixels, colour, shape, direction, positions)


def write_dataset(folder: str | Path, seeds: range | list[int], *, progress: bool = True) -> Path:
    """Write clips as ``clip_<seed>.mp4`` + ``clip_<seed>.txt``: the trainer's video-folder layout.

    The MP4s are H.264 at crf 10 (near-lossless at this size). Existing clips are kept, so an
    interrupted write resumes where it stopped (every file is written atomically).
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for seed in tqdm(seeds, desc="toy world clips", unit="clip", disable=not progress):
        video = folder / f"clip_{seed:07d}.mp4"
        text = video.with_suffix(".txt")
        if video.is_file() and text.is_file():
            continue
        clip = make_clip(seed)
        text.write_text(clip.caption + "\n", encoding="utf-8")
        write_video(clip.frames, video, fps=FPS, crf=10)  # atomic: a video means a complete pair
    return folder
