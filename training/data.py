"""Training clips: a folder of videos (optional same-name ``.txt`` captions), a WebVid-style CSV,
or a folder of frame folders.

A clip is ``num_frames`` frames taken every ``stride`` frames from a random start, resized to
cover ``resolution`` and centre-cropped. Clips that are too short or unreadable are skipped: the
dataset moves on to the next sample and reports what it skipped with the batch, so the trainer
can count and warn, and nothing hangs or crashes.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lookback_core.image_prep import fit_to_multiple
from lookback_core.video_io import VideoReadError, read_frames, rgb_array, video_info

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


def _caption_file(path: Path) -> Path | None:
    for candidate in (path.with_suffix(".txt"), path / "caption.txt", path.parent / f"{path.name}.txt"):
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
    root: str | Path, csv_path: str | Path | None = None, video_extension: str = ".mp4"
) -> list[Sample]:
    """List the samples under ``root``: from a WebVid CSV if given, else videos and frame folders."""
    root = Path(root)
    if csv_path is not None:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"videoid", "name", "page_dir"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{csv_path}: the CSV needs the columns videoid, name, page_dir; missing {sorted(missing)}"
                )
            return [
                Sample(
                    root / row["page_dir"] / f"{row['videoid']}{video_extension}", (row["name"] or "").strip()
                )
                for row in reader
            ]
    samples = []
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir() and _frame_files(path):
            samples.append(Sample(path, caption_file=_caption_file(path)))
    if not samples:
        raise ValueError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders found")
    return samples


def clip_key(sample: Sample, caption: str, start: int, stride: int, num_frames: int, resolution: int) -> str:
    """A stable name for one clip and its caption, used by the latent cache."""
    text = f"{sample.path.resolve()}|{caption}|{start}|{stride}|{num_frames}|{resolution}"
    return hashlib.sha1(text.encode()).hexdigest()


class VideoClipDataset(Dataset):
    """Clips as ``{"pixels": [f, 3, r, r] in [-1, 1], "caption", "key", "skipped"}``."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        num_frames: int,
        stride: int,
        resolution: int,
        reference_fps: float | None = None,
        seed: int = 0,
        fixed_clips: bool = False,
    ) -> None:
        self.samples = samples
        self.num_frames = num_frames
        self.stride = stride
        self.resolution = resolution
        self.reference_fps = reference_fps
        self.seed = seed
        self.epoch = 0
        self.fixed_clips = fixed_clips  # one clip per video (the centre one), as the cache needs

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Clip starts are drawn from (seed, epoch, index): reproducible, and the same after resume."""
        self.epoch = epoch

    def _stride_for(self, fps: float) -> int:
        if self.reference_fps is None or fps <= 0:
            return self.stride
        return max(1, round(self.stride * fps / self.reference_fps))

    def _read(self, sample: Sample, index: int) -> tuple[np.ndarray, int, int]:
        if sample.is_frame_folder:
            files = _frame_files(sample.path)
            total, stride = len(files), self.stride
        else:
            info = video_info(sample.path)
            total, stride = info.frames, self._stride_for(info.fps)
        span = (self.num_frames - 1) * stride + 1
        if total < span:
            raise ClipTooShort(f"{sample.path}: {total} frames, a clip needs {span}")
        if self.fixed_clips:
            start = (total - span) // 2
        else:
            start = random.Random(f"{self.seed}|{self.epoch}|{index}").randint(0, total - span)
        indices = [start + i * stride for i in range(self.num_frames)]
        if sample.is_frame_folder:
            try:
                frames = np.stack([_read_rgb(files[i]) for i in indices])
            except (OSError, ValueError) as err:  # unreadable images, or frames of different sizes
                raise VideoReadError(sample.path, str(err)) from None
        else:
            frames = read_frames(sample.path, indices)
        return frames, start, stride

    def __getitem__(self, index: int) -> dict:
        skipped: list[tuple[str, str]] = []
        for attempt in range(min(MAX_SKIPS_PER_ITEM, len(self.samples))):
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                caption = sample.caption
            except ValueError:
                skipped.append((str(sample.path), "unreadable caption"))
                continue
            try:
                frames, start, stride = self._read(sample, index)
            except (ClipTooShort, VideoReadError, OSError, ValueError) as err:
                skipped.append(
                    (str(sample.path), "too short" if isinstance(err, ClipTooShort) else "unreadable")
                )
                continue
            video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
            video, _ = fit_to_multiple(video, width=self.resolution, height=self.resolution, min_size=8)
            return {
                "pixels": video * 2 - 1,
                "caption": caption,
                "key": clip_key(sample, caption, start, stride, self.num_frames, self.resolution),
                "skipped": skipped,
            }
        raise RuntimeError(
            f"{len(skipped)} samples in a row could not give a {self.num_frames}-frame clip at stride "
            f"{self.stride} (last: {skipped[-1][0]}, {skipped[-1][1]}); check the data and --num_frames/--frame_stride"
        )


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
        "skipped": [s for item in items for s in item["skipped"]],
    }
