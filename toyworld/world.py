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

Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed names a clip. The seeds
fall in three disjoint splits (:data:`SPLITS`):

- *train* (:data:`TRAIN_SEEDS`): what models are trained on (the build takes ``0..n-1``);
- *validation* (:data:`VALIDATION_SEEDS`): every recipe choice, lever, threshold and build decision
  is made here. It holds 1,000,000.., the clips every lever before the test split existed was
  chosen on (and the demo's and the ComfyUI toy node's clips), and 2,000,000.., fresh ones;
- *test* (:data:`TEST_SEEDS`): reported figures only, never used for a choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookback_core.atomic import write_text
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
TRAIN_SEEDS = range(0, 1_000_000)
VALIDATION_SEEDS = range(1_000_000, 3_000_000)
TEST_SEEDS = range(3_000_000, 4_000_000)
SPLITS: dict[str, range] = {"train": TRAIN_SEEDS, "validation": VALIDATION_SEEDS, "test": TEST_SEEDS}
# the first seed no model is trained on: the demo's and the ComfyUI toy node's clip N is this + N
HELD_OUT_SEED = VALIDATION_SEEDS.start


def split_seeds(split: str, clips: int, first_seed: int | None = None) -> list[int]:
    """``clips`` consecutive seeds of ``split`` from ``first_seed`` (default: the split's start);
    ValueError unless they all lie in the split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    seeds = SPLITS[split]
    first = seeds.start if first_seed is None else first_seed
    if clips < 1 or first not in seeds or first + clips - 1 not in seeds:
        raise ValueError(
            f"{clips} clips from seed {first} leave the {split} split (seeds {seeds.start}..{seeds.stop - 1})"
        )
    return list(range(first, first + clips))


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


def make_clip(seed: int, frames: int = FRAMES, direction: str | None = None) -> ToyClip:
    """The clip named by ``seed`` (the same seed always gives the same clip), ``frames`` long
    (2..``MAX_FRAMES``). Longer clips start nearer the edge they move away from, so the object
    stays inside; the colour, shape, direction and background of a seed are the same at every
    length.

    ``direction``: the same start image (background, object, start position) moving another way
    instead of the seed's own (a counterfactual clip, see :func:`directions_allowed`); ValueError if
    the object would leave the frame."""
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(
            f"a toy-world clip has 2 to {MAX_FRAMES} frames (the object must stay inside the frame), got {frames}"
        )
    colour, shape, own, background, start = _draw(seed, frames)
    if direction is not None and direction not in directions_allowed(start, frames):
        raise ValueError(
            f"clip {seed} starts at {tuple(start.tolist())}: moving {direction} for {frames} frames leaves the "
            f"frame (allowed: {directions_allowed(start, frames)})"
        )
    direction = own if direction is None else direction
    positions = start + np.arange(frames)[:, None] * np.array(DIRECTIONS[direction]) * SPEED
    footprint = object_footprint(shape)
    pixels = np.empty((frames, SIZE, SIZE, 3), dtype=np.uint8)
    for i, (y, x) in enumerate(positions):
        frame = background.copy()
        frame[y : y + OBJECT_SIZE, x : x + OBJECT_SIZE][footprint] = COLOURS[colour]
        pixels[i] = np.round(frame).astype(np.uint8)
    return ToyClip(seed, pixels, colour, shape, direction, positions)


def _draw(seed: int, frames: int) -> tuple[str, str, str, np.ndarray, np.ndarray]:
    """The seed's colour, shape, own direction, background and start ``(y, x)`` for ``frames`` frames."""
    rng = np.random.default_rng(seed)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    background = _background(rng)
    low, high = _start_box(direction, frames)
    start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    return colour, shape, direction, background, start


def _start_box(direction: str, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest start ``(y, x)`` that keep the object inside for ``frames`` frames."""
    travel = np.array(DIRECTIONS[direction]) * SPEED * (frames - 1)
    return np.maximum(0, -travel), SIZE - OBJECT_SIZE - np.maximum(0, travel)


def directions_allowed(start: np.ndarray, frames: int = FRAMES) -> list[str]:
    """The directions an object starting at ``start`` ``(y, x)`` can move for ``frames`` frames and
    stay inside: the start image's cue. At 16 frames 22% of the world's clips allow one direction
    and 78% two (one across, one along), so the start image alone tells the direction in 61% of
    clips (the best guess from the position); the caption tells it in all."""
    return [d for d in DIRECTIONS if all(lo <= p <= hi for p, lo, hi in zip(start, *_start_box(d, frames)))]


def write_dataset(
    folder: str | Path, seeds: range | list[int], *, every_direction: bool = False, progress: bool = True
) -> Path:
    """Write clips as ``clip_<seed>.mp4`` + ``clip_<seed>.txt``: the trainer's video-folder layout.

    ``every_direction``: also each other direction the seed's start image allows, as
    ``clip_<seed>_<direction>.mp4`` (:func:`make_clip`'s counterfactual clips): every start image
    then comes with each caption it can take, so it no longer tells the direction; the caption must.
    The MP4s are H.264 at crf 10 (near-lossless at this size). Existing clips are kept, so an
    interrupted write resumes where it stopped (every file is written atomically).
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for seed in tqdm(seeds, desc="toy world clips", unit="clip", disable=not progress):
        for name, direction in dataset_clips(seed, every_direction):
            video = folder / f"{name}.mp4"
            text = video.with_suffix(".txt")
            if video.is_file() and text.is_file():
                continue
            clip = make_clip(seed, direction=direction)
            write_text(text, clip.caption + "\n")
            write_video(clip.frames, video, fps=FPS, crf=10)  # atomic: a video means a complete pair
    return folder


def dataset_clips(seed: int, every_direction: bool = False) -> list[tuple[str, str | None]]:
    """The files :func:`write_dataset` makes for ``seed``: (name without suffix, direction; None for
    the seed's own)."""
    clips: list[tuple[str, str | None]] = [(f"clip_{seed:07d}", None)]
    if every_direction:
        _, _, own, _, start = _draw(seed, FRAMES)
        clips += [(f"clip_{seed:07d}_{d}", d) for d in directions_allowed(start) if d != own]
    return clips
