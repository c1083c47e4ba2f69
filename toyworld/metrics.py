"""How well a generated video continues a toy-world start image, measured on its pixels.

The object is found in every frame by its known colour (:func:`object_mask`); from its area and
centroid per frame come:

- ``frame0_psnr``: PSNR (dB) of the generated frame 0 against the start image;
- ``persistence``: share of frames 1.. whose object area is within 0.5-1.5x of frame 0's;
- ``direction_ok``: the object moved at least ``MIN_TRAVEL`` px along the captioned direction by
  the last frame, with under ``MAX_SIDEWAYS`` px sideways;
- ``speed``: least-squares slope (px/frame) of the centroid along the captioned direction over
  the frames where the object is found (the world's truth: ``toyworld.SPEED``);
- ``background_drift``: mean absolute change (levels of 255) of frames 1.. against frame 0,
  outside the object (in either frame, grown by ``MASK_MARGIN`` px); ``drift_per_frame`` is the
  same for each frame (frame 0's is 0 by definition), to see where drift builds up;
- ``frame_jump``: the mean change from frame 0 to frame 1 over the mean change between later
  neighbours (1: an even pace; the paper's reviewers saw a jump after the first frame).

``summarise`` averages them over clips (direction accuracy: the share of clips with
``direction_ok``), :func:`intervals` gives each average's 95% interval and :func:`by_direction`
the direction accuracy per captioned direction.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch.nn.functional as F
from torch import from_numpy

from .world import DIRECTIONS

# The closest any background colour (channels 40..160) comes to an object colour is 40 (green's
# 200 against 160); pixels nearer than this to the object's colour are the object.
COLOUR_THRESHOLD = 36.0
MIN_TRAVEL = 10.0
MAX_SIDEWAYS = 8.0
MASK_MARGIN = 2
AREA_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class ClipMetrics:
    """The metrics of one generated clip (see the module docstring)."""

    frame0_psnr: float
    persistence: float
    direction_ok: bool
    travel: float
    sideways: float
    speed: float
    background_drift: float
    frame_jump: float = float("nan")
    drift_per_frame: tuple[float, ...] = ()
    direction: str = ""  # the captioned direction the clip was measured against

    def to_dict(self) -> dict:
        return asdict(self)


def object_mask(frames: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Boolean ``[f, h, w]``: pixels of ``frames`` ``[f, h, w, 3]`` (uint8) within the object colour."""
    distance = np.linalg.norm(frames.astype(np.float32) - np.asarray(rgb, dtype=np.float32), axis=-1)
    return distance < COLOUR_THRESHOLD


def centroids(mask: np.ndarray) -> np.ndarray:
    """``[f, 2]`` centroid ``(y, x)`` of each frame's mask; NaN where the mask is empty."""
    ys, xs = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]]
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(mask * ys).sum(axis=(1, 2)) / area, (mask * xs).sum(axis=(1, 2)) / area], axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images; identical images give 100 dB (not infinity, so means stay finite)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else min(100.0, float(10 * np.log10(255.0**2 / mse)))


def _grow(mask: np.ndarray, margin: int) -> np.ndarray:
    pooled = F.max_pool2d(from_numpy(mask[:, None].astype(np.float32)), 2 * margin + 1, 1, margin)
    return pooled[:, 0].numpy() > 0


def clip_metrics(
    frames: np.ndarray, start_image: np.ndarray, rgb: tuple[int, int, int], direction: str
) -> ClipMetrics:
    """Metrics of ``frames`` ``[f, h, w, 3]`` (uint8; frame 0 is the generated first frame)."""
    if frames.ndim != 4 or frames.shape[0] < 2 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [f >= 2, h, w, 3], got {frames.dtype} {frames.shape}")
    mask = object_mask(frames, rgb)
    area = mask.sum(axis=(1, 2))
    low, high = AREA_RANGE
    persistence = (
        float(np.mean((area[1:] >= low * area[0]) & (area[1:] <= high * area[0]))) if area[0] else 0.0
    )
    unit = np.asarray(DIRECTIONS[direction], dtype=np.float64)
    across = np.array([unit[1], -unit[0]])
    position = centroids(mask)
    along, side = position @ unit, position @ across
    found = np.isfinite(along)
    travel = float(along[-1] - along[0]) if found[0] and found[-1] else float("nan")
    sideways = float(abs(side[-1] - side[0])) if found[0] and found[-1] else float("nan")
    direction_ok = bool(np.isfinite(travel) and travel >= MIN_TRAVEL and sideways < MAX_SIDEWAYS)
    index = np.arange(len(frames))[found]
    speed = float(np.polyfit(index, along[found], 1)[0]) if len(index) >= 2 else float("nan")
    outside = ~(_grow(mask, MASK_MARGIN) | _grow(mask[:1], MASK_MARGIN))
    change = np.abs(frames[1:].astype(np.float64) - frames[:1].astype(np.float64)).mean(axis=-1)
    drift = float(change[outside[1:]].mean()) if outside[1:].any() else float("nan")
    per_frame = [float(c[o].mean()) if o.any() else float("nan") for c, o in zip(change, outside[1:])]
    return ClipMetrics(
        psnr(frames[0], start_image),
        persistence,
        direction_ok,
        travel,
        sideways,
        speed,
        drift,
        frame_jump(frames),
        (0.0, *per_frame),
        direction,
    )


def frame_jump(frames: np.ndarray) -> float:
    """How much bigger the step from frame 0 to frame 1 is than the later steps between neighbours
    (the paper's reviewers saw a jump there): 1 for an even pace; NaN under 3 frames or a still clip."""
    steps = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
    if len(steps) < 2 or steps[1:].mean() == 0:
        return float("nan")
    return float(steps[0] / steps[1:].mean())


def mean_drift_per_frame(results: list[ClipMetrics]) -> list[float]:
    """The background drift of each frame, averaged over clips (NaN where no clip measured it)."""
    table = np.asarray([r.drift_per_frame for r in results], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a frame no clip measured: NaN, said above
        return [float(v) for v in np.nanmean(table, axis=0)]


def summarise(results: list[ClipMetrics]) -> dict[str, float]:
    """Means over clips; ``direction_accuracy`` is the share of clips with ``direction_ok``."""
    if not results:
        raise ValueError("no clips to summarise")

    def mean(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        "clips": len(results),
        "frame0_psnr": mean([r.frame0_psnr for r in results]),
        "frame0_psnr_min": float(min(r.frame0_psnr for r in results)),
        "persistence": mean([r.persistence for r in results]),
        "direction_accuracy": float(np.mean([r.direction_ok for r in results])),
        "speed": mean([r.speed for r in results]),
        "background_drift": mean([r.background_drift for r in results]),
        "frame_jump": mean([r.frame_jump for r in results]),
    }


# The 95% intervals' normal quantile.
Z95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (good at any n, and inside [0, 1] even at 0 or n
    successes, where the normal approximation collapses to a point)."""
    if trials < 1:
        return (float("nan"), float("nan"))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (float(centre - half), float(centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of the mean of the finite ``values``: the mean +- z standard errors (the normal
    approximation; fair for the 32 and more clips the reports use)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(finite) < 2:
        return (float("nan"), float("nan"))
    half = z * finite.std(ddof=1) / np.sqrt(len(finite))
    return (float(finite.mean() - half), float(finite.mean() + half))


def bootstrap_interval(values: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of the finite ``values`` (a fixed seed, so a
    report is reproducible). Unlike mean +- z standard errors it never leaves the values' range: for
    a share such as the persistence, most clips at 1.0, the normal interval passes 1."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(finite) < 2:
        return (float("nan"), float("nan"))
    draws = np.random.default_rng(seed).integers(0, len(finite), size=(resamples, len(finite)))
    means = finite[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(low), float(high))


INTERVAL_METRICS = ("frame0_psnr", "speed", "background_drift")  # by mean_interval
SHARE_METRICS = ("persistence",)  # in [0, 1], most clips at 1: by bootstrap_interval


def intervals(results: list[ClipMetrics]) -> dict[str, tuple[float, float]]:
    """The 95% interval of each averaged metric over the clips: the direction accuracy (a
    proportion) by :func:`wilson_interval`, the persistence (a share, bounded by 1) by
    :func:`bootstrap_interval`, the others by :func:`mean_interval`."""
    found = {key: mean_interval([getattr(r, key) for r in results]) for key in INTERVAL_METRICS}
    found |= {key: bootstrap_interval([getattr(r, key) for r in results]) for key in SHARE_METRICS}
    found["direction_accuracy"] = wilson_interval(sum(r.direction_ok for r in results), len(results))
    return found


def by_direction(results: list[ClipMetrics]) -> dict[str, tuple[int, int]]:
    """Per captioned direction (in the world's order): (clips that moved that way, clips)."""
    return {
        d: (sum(r.direction_ok for r in results if r.direction == d), sum(r.direction == d for r in results))
        for d in DIRECTIONS
    }
