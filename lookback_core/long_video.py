"""Videos of any length in the memory of one chunk.

The first chunk is sampled from the image as usual. Every following chunk pins the last ``c``
frames of what was generated so far as clean context and samples ``chunk_frames - c`` new
frames after them, so the look-back modules see the previous frames exactly as they see the
given image. The model only ever runs on ``chunk_frames`` frames; finished frames go to a CPU
buffer (and to ``on_chunk``, to decode or write them as they come).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .sampler import SamplerSettings, StepCallback, offset_seed, sample_video
from .temporal_unet import LookBackUNet

ChunkCallback = Callable[[int, torch.Tensor], None]


def chunk_count(num_frames: int, chunk_frames: int, context_frames: int) -> int:
    """How many chunks ``num_frames`` frames take."""
    if num_frames <= chunk_frames:
        return 1
    return 1 + math.ceil((num_frames - chunk_frames) / (chunk_frames - context_frames))


def default_context(chunk_frames: int, depth: int | None, recorded: int | None = None) -> int:
    """The frames of the video so far each chunk of ``chunk_frames`` starts from when the user
    gives no number: the weights' ``recorded`` context, else the look-back depth ``depth`` (what
    one look-back conv reads; 1 for the base UNet alone), at most ``chunk_frames - 1``."""
    return max(1, min(recorded or depth or 1, chunk_frames - 1))


def resolve_chunking(
    num_frames: int,
    chunk_frames: int | None,
    context_frames: int | None,
    depth: int | None,
    names: tuple[str, str, str] = ("num_frames", "chunk_frames", "context_frames"),
    horizon: int | None = None,
    context: int | None = None,
) -> tuple[int, int]:
    """Check the frame counts of a run and fill in the defaults; returns ``(chunk_frames, context_frames)``.

    ``chunk_frames`` None: one pass over all frames, or, for more frames than the weights'
    ``horizon`` (the longest video they were checked to sample in one piece), chunks of
    ``horizon`` frames; a ``chunk_frames`` of at least ``num_frames`` asks for one pass.
    ``context_frames`` None: :func:`default_context` of the weights' ``context`` (the context
    their chunks were checked with) and the look-back depth ``depth``. ``names`` are how the caller's user
    calls the three numbers (flags, node inputs), for the messages."""
    frames_name, chunk_name, context_name = names
    if num_frames < 2:
        raise ValueError(f"{frames_name} must be at least 2 (the image and one new frame), got {num_frames}")
    if chunk_frames is not None and chunk_frames < 2:
        raise ValueError(f"{chunk_name} must be at least 2 (context and one new frame), got {chunk_frames}")
    if chunk_frames is None and horizon is not None and num_frames > horizon:
        chunk_frames = horizon
    if context_frames is not None and chunk_frames is None:
        raise ValueError(f"{context_name} needs {chunk_name} (or more frames than the weights' horizon)")
    chunk = min(chunk_frames or num_frames, num_frames)  # a chunk longer than the video is the video
    if context_frames is None:
        return chunk, default_context(chunk, depth, context)
    if not 1 <= context_frames < chunk:
        raise ValueError(
            f"{context_name} must be between 1 and {chunk_name} - 1 ({chunk - 1}), got {context_frames}"
        )
    return chunk, context_frames


def sample_long_video(
    model: LookBackUNet,
    image_latent: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    num_frames: int,
    settings: SamplerSettings,
    scheduler_config: dict[str, Any],
    *,
    chunk_frames: int | None = None,
    context_frames: int | None = None,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_chunk: ChunkCallback | None = None,
) -> torch.Tensor:
    """Sample ``num_frames`` frames from ``image_latent`` ``[b, c, h, w]``, in chunks if needed.

    Without ``chunk_frames`` (or when the video fits in one chunk) this is one
    :func:`~lookback_core.sampler.sample_video` pass. ``context_frames`` (``c``, 1 <= c <
    ``chunk_frames``; default the model's look-back depth ``d``, which is what one look-back
    conv reads, or 1 for the base UNet alone) clean frames of the previous chunk start each following chunk. Chunk ``i``
    draws its noise from ``seed + i`` (modulo 2^64, :func:`~lookback_core.sampler.offset_seed`).
    ``on_step`` counts steps over all chunks; ``on_chunk(start, frames)`` receives each chunk's
    new frames ``[b, c, n, h, w]`` and where they start. Returns ``[b, c, num_frames, h, w]``
    on the CPU.
    """
    depth = model.config.depth if context_frames is None and model.config is not None else None
    chunk_frames, context_frames = resolve_chunking(num_frames, chunk_frames, context_frames, depth)
    b, c, h, w = image_latent.shape
    video = torch.empty(b, c, num_frames, h, w, dtype=torch.float32)
    video[:, :, 0] = image_latent.float().cpu()
    chunks = chunk_count(num_frames, chunk_frames, context_frames)
    done, pinned = 1, image_latent.unsqueeze(2)
    for index in range(chunks):
        frames = min(chunk_frames, pinned.shape[2] + num_frames - done)
        progress = None
        if on_step is not None:
            progress = lambda step, total, x, i=index: on_step(i * total + step, chunks * total, x)  # noqa: E731
        chunk = sample_video(
            model, pinned, positive, negative, frames, replace(settings, seed=offset_seed(settings.seed, index)),
            scheduler_config, on_step=progress, should_cancel=should_cancel,
        )  # fmt: skip
        new = chunk[:, :, pinned.shape[2] :]
        video[:, :, done : done + new.shape[2]] = new.float().cpu()
        if on_chunk is not None:
            on_chunk(done, new)
        done += new.shape[2]
        pinned = chunk[:, :, -context_frames:]
    return video
