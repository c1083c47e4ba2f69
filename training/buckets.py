"""Buckets: every batch holds clips of one shape (width, height, frames), so videos of any aspect
ratio and length train without being cropped square or cut to one length.

For a resolution ``r`` the aspect-ratio buckets are the sizes whose sides are multiples of
:data:`STEP` (what the SD1.5 UNet halves three times after the VAE's factor of 8), whose area is at
most ``r`` squared and at least :data:`MIN_FILL` of it (at 256 the largest sizes alone would give
a 4:3 video 5:3 or 1:1), from :data:`MAX_ASPECT` wide to as tall. A video goes to the bucket nearest its aspect ratio (on a log
scale) among those it covers: nothing is upscaled. A video smaller than every bucket of its
aspect gets one of its own, its size rounded down to the step. A clip is then resized to cover its
bucket and centre-cropped: what is cut is only what the bucket's aspect ratio needs.

Frame-count buckets: a dataset may list several frame counts; a video gives a clip of each count
it is long enough for.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import Sampler

STEP = 64
MAX_ASPECT = 4.0
MIN_FILL = 0.75


@dataclass(frozen=True, order=True)
class Bucket:
    """One batch shape: frame size in pixels and frames per clip."""

    width: int
    height: int
    frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}, {self.frames} frames"


def bucket_sizes(resolution: int, step: int = STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The aspect-ratio buckets of ``resolution``, as (width, height), widest last."""
    area = resolution * resolution
    sides = range(step, area // step + 1, step)
    sizes = [
        (w, h) for w in sides for h in sides
        if MIN_FILL * area <= w * h <= area and max(w / h, h / w) <= max_aspect
    ]  # fmt: skip
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def bucket_for(width: int, height: int, resolution: int, step: int = STEP) -> tuple[int, int] | None:
    """The bucket (width, height) of a ``width`` x ``height`` video at ``resolution``: see the
    module's text. ``None`` when a side is under one step."""
    aspect = math.log(width / height)
    covered = [s for s in bucket_sizes(resolution, step) if s[0] <= width and s[1] <= height]
    if covered:
        return min(covered, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    scale = min(1.0, resolution / math.sqrt(width * height))
    own = (int(width * scale) // step * step, int(height * scale) // step * step)
    return own if min(own) >= step else None


def bucket_table(buckets: Sequence[Bucket], batch_size: int) -> str:
    """The buckets of a run, with their clips and batches: printed when training starts."""
    counts = Counter(buckets)
    lines = [f"{'bucket':>26}  {'clips':>7}  {'batches':>7}"]
    for bucket in sorted(counts):
        lines.append(f"{str(bucket):>26}  {counts[bucket]:>7}  {math.ceil(counts[bucket] / batch_size):>7}")
    return "\n".join(lines)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices, each from one bucket (``buckets[i]``: item i's).

    Each epoch shuffles every bucket's items and the order of the batches, drawn from (seed, epoch):
    the same after a resume. A bucket's last batch is filled from the start of its shuffled items,
    so every batch is full (a bucket smaller than a batch repeats its items)."""

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, seed: int) -> None:
        self.groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size = batch_size
        self.drop_last = False  # read by accelerate: every batch is whole anyway
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}|{self.epoch}")
        batches = []
        for key in sorted(self.groups, key=repr):
            items = list(self.groups[key])
            rng.shuffle(items)
            count = math.ceil(len(items) / self.batch_size)
            filled = (items * math.ceil(count * self.batch_size / len(items)))[: count * self.batch_size]
            batches += [filled[i : i + self.batch_size] for i in range(0, len(filled), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)
