"""Training clips: from datasets (:mod:`training.dataset_config`), each a folder of videos
(optional same-name caption files), a WebVid-style CSV, or a folder of frame folders.

Each video gives one item per resolution and frame count of its dataset (times its repeats), in
a bucket (:mod:`training.buckets`): a clip is the bucket's frame count taken every ``frame_stride``
frames from a random start, resized to cover the bucket's size and centre-cropped. A dataset with
buckets is sized when the run starts (each video's size and length read from its container), so
a video too short or too small for a bucket gets no item; a square dataset is not, and its clips
that are too short are found when read. A clip that is too short or unreadable is skipped: the
dataset moves on to the next item of the same bucket and reports what it skipped with the batch,
so the trainer can count and warn, and nothing hangs or crashes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lookback_core.image_prep import fit_to_multiple
from lookback_core.video_io import VideoReadError, read_frames, rgb_array, video_info
from training.buckets import Bucket, bucket_for
from training.dataset_config import DatasetSpec

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_SKIPS_PER_ITEM = 50


@dataclass(frozen=True)
class Sample:
    """One source of clips: a video file or a folder of frames, and its caption.

    The caption is given (a CSV's) or read from ``caption_file`` when a clip is made, so a caption
    that cannot be read skips that sample like an unreadable video instead of stopping the run."""

    path: Path
    given_caption: str | None = None
    caption_file: Path | None = None

    @property
    def is_frame_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def caption(self) -> str:
        """The caption text; raises ``ValueError`` naming the file if it is not UTF-8 text."""
        if self.given_caption is not None:
            return self.given_caption
        if self.caption_file is None:
            return ""
        try:
            return self.caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.caption_file}: the caption is not UTF-8 text ({err.reason})") from None


class ClipTooShort(ValueError):
    """A sample with fewer frames than one clip needs."""


def _caption_file(path: Path, extension: str = ".txt") -> Path | None:
    for candidate in (
        path.with_suffix(extension),
        path / f"caption{extension}",
        path.parent / f"{path.name}{extension}",
    ):
        if candidate.is_file():
            return candidate
    return None


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB, whatever its mode (grayscale, RGBA, palette, 16-bit)."""
    with Image.open(path) as image:
        return rgb_array(image)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def discover_samples(
    root: str | Path,
    csv_path: str | Path | None = None,
    video_extension: str = ".mp4",
    caption_column: str = "name",
    caption_extension: str = ".txt",
) -> list[Sample]:
    """List the samples under ``root``: from a WebVid CSV if given (the caption from its
    ``caption_column``), else videos and frame folders (the caption from a ``caption_extension``
    file beside each)."""
    root = Path(root)
    if csv_path is not None:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            needed = ("videoid", caption_column, "page_dir")
            missing = set(needed) - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{csv_path}: the CSV needs the columns {', '.join(needed)}; missing {sorted(missing)}"
                )
            return [
                Sample(
                    root / row["page_dir"] / f"{row['videoid']}{video_extension}",
                    (row[caption_column] or "").strip(),
                )
                for row in reader
            ]
    samples = []
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir() and _frame_files(path):
            samples.append(Sample(path, caption_file=_caption_file(path, caption_extension)))
    if not samples:
        raise ValueError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders found")
    return samples


def clip_key(sample: Sample, caption: str, start: int, stride: int, bucket: Bucket) -> str:
    """A stable name for one clip and its caption, used by the latent cache."""
    text = (
        f"{sample.path.resolve()}|{caption}|{start}|{stride}|{bucket.frames}|{bucket.width}x{bucket.height}"
    )
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class ClipItem:
    """One clip a sample gives each epoch: its bucket and the dataset it belongs to."""

    sample: Sample
    bucket: Bucket
    dataset: DatasetSpec

    @property
    def name(self) -> str:
        """Stable across processes and runs: what the cache step's manifest lists it by."""
        text = json.dumps(
            [str(self.sample.path.resolve()), asdict(self.bucket), asdict(self.dataset)], default=str
        )
        return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class ClipWindows:
    """With a latent cache, the clips a video gives: ``count`` windows, their starts spread evenly
    over the video (``spread``; one window: the centre) or drawn once from the seed (``random``).
    Epoch ``e`` takes item ``i``'s window ``(e + i) % count``, so the epochs see different clips."""

    count: int = 1
    mode: str = "spread"

    def start(self, total: int, span: int, seed: int, item: ClipItem, window: int) -> int:
        room = total - span
        if self.mode == "random":
            return random.Random(f"{seed}|{item.sample.path.resolve()}|{window}").randint(0, room)
        return room // 2 if self.count == 1 else round(window * room / (self.count - 1))


def _stride(dataset: DatasetSpec, fps: float) -> int:
    """The dataset's frame stride, scaled to a video's ``fps`` when it names a reference fps."""
    if dataset.reference_fps is None or fps <= 0:
        return dataset.frame_stride
    return max(1, round(dataset.frame_stride * fps / dataset.reference_fps))


def _size_and_length(sample: Sample) -> tuple[int, int, int, float]:
    """A sample's (width, height, frames, fps), from its container or its frame files (fps 0: unknown)."""
    if sample.is_frame_folder:
        files = _frame_files(sample.path)
        with Image.open(files[0]) as image:
            return image.width, image.height, len(files), 0.0
    info = video_info(sample.path)
    return info.width, info.height, info.frames, info.fps


def clip_items(datasets: list[DatasetSpec]) -> tuple[list[ClipItem], list[tuple[str, str]]]:
    """Every dataset's items (see the module's text), and the samples that gave none, with why."""
    items: list[ClipItem] = []
    left_out: list[tuple[str, str]] = []
    for dataset in datasets:
        samples = discover_samples(
            dataset.path,
            dataset.csv,
            dataset.video_extension,
            dataset.caption_column,
            dataset.caption_extension,
        )
        if not dataset.buckets:  # square crops: nothing to size; a clip too short is skipped when read
            items += [
                ClipItem(sample, Bucket(r, r, n), dataset)
                for sample in samples for r in dataset.resolution for n in dataset.num_frames
            ] * dataset.repeats  # fmt: skip
            continue
        for sample in tqdm(samples, desc=f"sizing {dataset.path}", unit="video", leave=False):
            try:
                width, height, length, fps = _size_and_length(sample)
            except (VideoReadError, OSError, ValueError) as err:
                left_out.append((str(sample.path), f"unreadable ({err})"))
                continue
            stride = _stride(dataset, fps)
            counts = [n for n in dataset.num_frames if (n - 1) * stride + 1 <= length]
            # (two resolutions can give a small video the same bucket of its own size: once)
            sizes = list(dict.fromkeys(s for r in dataset.resolution if (s := bucket_for(width, height, r))))
            if not counts:
                needed = (min(dataset.num_frames) - 1) * stride + 1
                left_out.append(
                    (str(sample.path), f"too short: {length} frames, the shortest clip needs {needed}")
                )
            elif not sizes:
                left_out.append((str(sample.path), f"too small: {width}x{height}"))
            items += [
                ClipItem(sample, Bucket(w, h, n), dataset) for w, h in sizes for n in counts
            ] * dataset.repeats  # fmt: skip
    return items, left_out


class CacheGone(RuntimeError):
    """A cache entry the cache step's manifest lists is no longer there."""


class VideoClipDataset(Dataset):
    """Clips as ``{"pixels": [f, 3, h, w] in [-1, 1], "caption", "key", "skipped"}``, item ``i`` in
    bucket ``items[i].bucket``; from a complete cache (``cache`` and its ``manifest``) as
    ``{"latents", "text", ...}`` instead, without opening a video.

    ``windows``: the clips each video gives (:class:`ClipWindows`, with a cache); ``None``: a
    start drawn from (seed, epoch, index) each epoch."""

    def __init__(
        self,
        items: list[ClipItem],
        *,
        seed: int = 0,
        windows: ClipWindows | None = None,
        cache=None,  # training.cache.LatentCache, with manifest
        manifest: dict[str, list[str]] | None = None,
    ) -> None:
        if not items:
            raise ValueError("no clips to train on: every video was too short, too small or unreadable")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.windows = windows
        self.cache, self.manifest = cache, manifest
        self._peers: dict[Bucket, list[int]] = {}  # each bucket's items, to skip to the next of them
        for index, item in enumerate(items):
            self._peers.setdefault(item.bucket, []).append(index)
        self._place = {index: k for peers in self._peers.values() for k, index in enumerate(peers)}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def buckets(self) -> list[Bucket]:
        return [item.bucket for item in self.items]

    def set_epoch(self, epoch: int) -> None:
        """Clip starts are drawn from (seed, epoch, index): reproducible, and the same after resume."""
        self.epoch = epoch

    def locate(self, item: ClipItem, index: int, window: int | None = None) -> tuple[int, int]:
        """The ``(start, stride)`` of item ``items[index]``'s clip this epoch (or of its cache
        ``window``), from the video's container or the frame files' count; raises ClipTooShort."""
        sample, frames_wanted = item.sample, item.bucket.frames
        if sample.is_frame_folder:
            total, stride = len(_frame_files(sample.path)), item.dataset.frame_stride
        else:
            info = video_info(sample.path)
            total, stride = info.frames, _stride(item.dataset, info.fps)
        span = (frames_wanted - 1) * stride + 1
        if total < span:
            raise ClipTooShort(f"{sample.path}: {total} frames, a clip needs {span}")
        if self.windows is not None:
            window = (self.epoch + index) % self.windows.count if window is None else window
            return self.windows.start(total, span, self.seed, item, window), stride
        return random.Random(f"{self.seed}|{self.epoch}|{index}").randint(0, total - span), stride

    def decode(self, item: ClipItem, start: int, stride: int) -> torch.Tensor:
        """The clip's frames ``[f, 3, h, w]`` in [-1, 1], fitted to its bucket."""
        indices = [start + i * stride for i in range(item.bucket.frames)]
        if item.sample.is_frame_folder:
            files = _frame_files(item.sample.path)
            try:
                frames = np.stack([_read_rgb(files[i]) for i in indices])
            except (OSError, ValueError) as err:  # unreadable images, or frames of different sizes
                raise VideoReadError(item.sample.path, str(err)) from None
        else:
            frames = read_frames(item.sample.path, indices)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        video, _ = fit_to_multiple(video, width=item.bucket.width, height=item.bucket.height, min_size=8)
        return video * 2 - 1

    def _cached(self, item: ClipItem, index: int) -> dict | None:
        keys = self.manifest.get(item.name) if self.manifest is not None else None
        if not keys:
            return None
        key = keys[(self.epoch + index) % len(keys)]
        entry = self.cache.get(key)
        if entry is None:
            raise CacheGone(
                f"the cache entry {key} of {item.sample.path} is gone from {self.cache.folder}; run the cache "
                "step again (--cache_only): it encodes only what is missing"
            )
        return {"latents": entry["latents"], "text": entry["text"], "key": key}

    def __getitem__(self, index: int) -> dict:
        skipped: list[tuple[str, str]] = []
        peers = self._peers[self.items[index].bucket]
        for attempt in range(min(MAX_SKIPS_PER_ITEM, len(peers))):
            item = self.items[peers[(self._place[index] + attempt) % len(peers)]]
            try:
                caption = item.sample.caption
            except ValueError:
                skipped.append((str(item.sample.path), "unreadable caption"))
                continue
            if self.manifest is not None:
                cached = self._cached(item, index)
                if cached is None:  # the cache step found no clip in it
                    skipped.append((str(item.sample.path), "too short or unreadable (cache step)"))
                    continue
                return {**cached, "caption": caption, "skipped": skipped}
            try:
                start, stride = self.locate(item, index)
                pixels = self.decode(item, start, stride)
            except (ClipTooShort, VideoReadError, OSError, ValueError) as err:
                skipped.append(
                    (str(item.sample.path), "too short" if isinstance(err, ClipTooShort) else "unreadable")
                )
                continue
            return {
                "pixels": pixels,
                "caption": caption,
                "key": clip_key(item.sample, caption, start, stride, item.bucket),
                "skipped": skipped,
            }
        bucket = self.items[index].bucket
        raise RuntimeError(
            f"{len(skipped)} samples in a row could not give a clip of {bucket} at stride "
            f"{self.items[index].dataset.frame_stride} (last: {skipped[-1][0]}, {skipped[-1][1]}); check the data "
            "and the frame counts and strides"
        )


def collate(items: list[dict]) -> dict:
    """A batch: the clips' ``pixels`` stacked, or (from a complete cache) their ``latents`` and ``text``."""
    cached = "latents" in items[0]
    tensors = ("latents", "text") if cached else ("pixels",)
    return {
        **{name: torch.stack([item[name] for item in items]) for name in tensors},
        "frames": sum(item["latents"].shape[1] if cached else item["pixels"].shape[0] for item in items),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
        "skipped": [s for item in items for s in item["skipped"]],
    }
