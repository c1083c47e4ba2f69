"""The memory estimate that lets `generate` refuse an impossible run before it loads anything."""

from __future__ import annotations

import pytest
import torch

from lookback_core import memory
from lookback_core.memory import estimate_generate, largest_chunk_that_fits, shortfall

BASE = dict(
    width=256, height=256, frames=16, frames_at_once=16, guidance=True, parameters=10**9, file_bytes=2 * 10**9
)


def test_the_estimate_grows_with_frames_size_and_dtype_as_modelled() -> None:
    one = estimate_generate(**BASE, dtype=torch.float32)
    assert one.weights == 4 * 10**9 and one.files == 2 * 10**9
    assert one.sampling == 32 * 32 * 32 * memory.SAMPLING_BYTES_PER_CELL  # 16 frames x2 for CFG, 32x32 cells
    double_frames = estimate_generate(**{**BASE, "frames": 32, "frames_at_once": 32}, dtype=torch.float32)
    assert double_frames.sampling == 2 * one.sampling and double_frames.frames == 2 * one.frames
    chunked = estimate_generate(**{**BASE, "frames": 32, "frames_at_once": 8}, dtype=torch.float32)
    assert chunked.sampling == one.sampling // 2 and chunked.frames == double_frames.frames
    half = estimate_generate(**BASE, dtype=torch.float16)
    assert half.weights == one.weights // 2 and half.sampling == one.sampling // 2
    no_cfg = estimate_generate(**{**BASE, "guidance": False}, dtype=torch.float32)
    assert no_cfg.sampling == one.sampling // 2
    wide = estimate_generate(**{**BASE, "width": 512}, dtype=torch.float32)
    assert wide.sampling == 2 * one.sampling and wide.decoding == 2 * one.decoding


def test_shortfall_names_the_memory_and_both_figures(monkeypatch) -> None:
    estimate = estimate_generate(**BASE, dtype=torch.float32)
    needed = estimate.device_bytes + estimate.host_bytes
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(needed / memory.HEADROOM) + 1)
    assert shortfall(estimate, torch.device("cpu")) is None
    monkeypatch.setattr(memory, "host_available_bytes", lambda: needed)
    problem = shortfall(estimate, torch.device("cpu"))
    assert (
        problem
        == f"needs about {needed / 2**30:.1f} GiB of host memory, {needed / 2**30:.1f} GiB is available"
    )
    monkeypatch.setattr(memory, "host_available_bytes", lambda: None)  # unknown: never refuse
    assert shortfall(estimate, torch.device("cpu")) is None


def test_host_memory_is_read_on_this_machine() -> None:
    available = memory.host_available_bytes()
    assert available is None or 0 < available < 2**50


@pytest.mark.parametrize(("limit", "expected"), [(7, 7), (2, 2), (1, None), (40, 20)])
def test_largest_chunk_that_fits(limit, expected) -> None:
    assert largest_chunk_that_fits(lambda n: n <= limit, 2, 20) == expected
