"""Long videos in chunks: continuity, bounded model calls, and flat peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import randomize
from diffusers import DDIMScheduler
from einops import rearrange

from lookback_core.config import preset
from lookback_core.long_video import chunk_count, resolve_chunking, sample_long_video
from lookback_core.sampler import SamplerSettings, sample_video
from lookback_core.temporal_unet import create_lookback_unet

REPO = Path(__file__).parents[1]
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip


@pytest.fixture
def model(tiny_unet):
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal, scale=0.02)
    return model


class Spy:
    def __init__(self, model) -> None:
        self.model, self.inputs = model, []

    def __call__(self, x, t, ctx):
        self.inputs.append(x.clone())
        return self.model(x, t, ctx)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 5, 32, generator=g),
        torch.randn(1, 5, 32, generator=g),
    )


def test_one_chunk_is_plain_sampling(model) -> None:
    z0, pos, neg = _inputs()
    settings = SamplerSettings(steps=2, seed=4)
    long = sample_long_video(model, z0, pos, neg, 5, settings, SCHEDULER, chunk_frames=8, context_frames=3)
    torch.testing.assert_close(long, sample_video(model, z0, pos, neg, 5, settings, SCHEDULER))


def test_chunks_continue_from_pinned_context_and_never_exceed_the_chunk(model) -> None:
    z0, pos, neg = _inputs()
    spy, chunks, steps = Spy(model), [], []
    video = sample_long_video(
        spy, z0, pos, neg, 17, SamplerSettings(steps=2, cfg_scale=3.0), SCHEDULER, chunk_frames=6, context_frames=3,
        on_chunk=lambda start, new: chunks.append((start, new.shape[2])), on_step=lambda i, n, x: steps.append((i, n)),
    )  # fmt: skip
    assert video.shape == (1, 4, 17, 8, 8) and torch.equal(video[:, :, 0], z0)
    n = chunk_count(17, 6, 3)
    assert n == 5 and chunks == [(1, 5), (6, 3), (9, 3), (12, 3), (15, 2)]
    assert steps == [(i, n * 2) for i in range(1, n * 2 + 1)]
    assert len(spy.inputs) == n * 2 and max(x.shape[2] for x in spy.inputs) == 6
    # chunk k's first 3 frames, at every step, are the finished frames before it
    for k, (start, _) in enumerate(chunks[1:], start=1):
        for x in spy.inputs[2 * k : 2 * k + 2]:
            torch.testing.assert_close(x[1:, :, :3], video[:, :, start - 3 : start])


def test_each_chunk_starts_from_ksamplers_noise_for_its_latent_with_its_seed(model) -> None:
    # chunk i: KSampler's draw (frames as the batch) from seed + i for Look-Back Extend Video's
    # latent of the chunk (context, then new frames), the context's share dropped, scaled to the
    # first step as lookback_core.sampler says
    z0, pos, _ = _inputs()
    spy = Spy(model)
    seed, steps = 2**64 - 1, 2
    sample_long_video(spy, z0, pos, None, 9, SamplerSettings(steps=steps, seed=seed), SCHEDULER,
                      chunk_frames=5, context_frames=2)  # fmt: skip
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    scheduler.set_timesteps(steps)
    scale = (1 - scheduler.alphas_cumprod[scheduler.timesteps[0]]).sqrt()
    assert len(spy.inputs) == 3 * steps  # three chunks
    for index, (frames, pinned) in enumerate([(5, 1), (5, 2), (3, 2)]):
        chunk_seed = (seed + index) % 2**64  # wraps round 2^64
        noise = torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(chunk_seed))
        first = spy.inputs[index * steps]
        assert first.shape[2] == frames
        want = rearrange(noise[pinned:], "f c h w -> 1 c f h w") * scale
        torch.testing.assert_close(first[:, :, pinned:], want, rtol=1e-6, atol=1e-6)


def test_bad_chunking_is_refused(model) -> None:
    z0, pos, neg = _inputs()
    with pytest.raises(
        ValueError, match=r"context_frames must be between 1 and chunk_frames - 1 \(3\), got 4"
    ):
        sample_long_video(
            model, z0, pos, neg, 20, SamplerSettings(steps=1), SCHEDULER, chunk_frames=4, context_frames=4
        )


def test_the_context_is_the_users_else_the_weights_else_the_depth() -> None:
    # (num_frames, chunk_frames, context_frames, depth, horizon, recorded context) -> (chunk, context)
    for given, expected in (
        ((24, None, None, 3, 16, 5), (16, 5)),  # past the horizon: the weights' chunk and context
        ((24, None, None, 3, 16, None), (16, 3)),  # none recorded: the depth
        ((24, None, 2, 3, 16, 5), (16, 2)),  # the user's number wins
        ((24, 6, None, 3, 16, 8), (6, 5)),  # never the whole chunk
        ((12, None, None, 3, 16, 5), (12, 5)),  # one piece (the context is then unused)
        ((24, None, None, None, None, None), (24, 1)),  # the base UNet alone, no horizon
        # a chunk longer than the video is one pass over the video (the memory estimate took the
        # chunk's length: --chunk-frames 100000 with --frames 16 was refused as 781 GiB)
        ((16, 100_000, None, 3, 16, 5), (16, 5)),
    ):
        num_frames, chunk, context, depth, horizon, recorded = given
        assert (
            resolve_chunking(num_frames, chunk, context, depth, horizon=horizon, context=recorded) == expected
        )


def _peak_growth(frames: int, chunk: int) -> float:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "peak_memory_probe.py"),
        "--frames",
        str(frames),
        "--chunk",
        str(chunk),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four at once on the suite's cores
    out = json.loads(
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300, env=env).stdout
    )
    return out["peak_mib"] - out["before_mib"]


def test_peak_memory_stays_flat_as_length_grows() -> None:
    # Each run in a fresh process (peak RSS only grows within one, so the four can run at once).
    # One pass over all frames grows with the length; chunks of 6 do not.
    runs = [(8, 6), (40, 6), (8, 0), (40, 0)]
    with ThreadPoolExecutor(len(runs)) as pool:
        chunked_8, chunked_40, unchunked_8, unchunked_40 = pool.map(lambda run: _peak_growth(*run), runs)
    chunked, unchunked = [chunked_8, chunked_40], [unchunked_8, unchunked_40]
    growth_unchunked = unchunked[1] - unchunked[0]
    assert growth_unchunked > 150, unchunked  # the measurement can see growth at all
    assert chunked[1] - chunked[0] < 0.15 * growth_unchunked, (chunked, unchunked)
