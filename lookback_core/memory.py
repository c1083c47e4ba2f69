"""The memory a ``generate`` run needs, estimated before anything loads.

An impossible run (a 9000x9000 image, ``--frames 100000``) is refused in a second with the
estimate and the way out, instead of running the machine out of memory minutes later. The
estimate is deliberately simple and on the high side:

- **weights**: every tensor of the checkpoint and the temporal weights at the run's dtype, plus
  the files themselves, which are read whole into host memory while loading;
- **sampling**: :data:`SAMPLING_BYTES_PER_CELL` per latent cell (``h/8 x w/8``) per UNet frame
  in flight (the frames of one chunk, twice with classifier-free guidance), scaled by the dtype
  size. Measured on the full SD1.5 UNet at 256x256 (docs/benchmarks.md): 48 KiB per cell for
  the base UNet, 57 KiB with ``light`` look-back modules;
- **decoding**: the VAE decoder works on :data:`DECODE_FRAMES` frames at a time at full
  resolution, :data:`DECODE_BYTES_PER_PIXEL` per pixel per frame;
- **image**: the start image decoded at its own size (8-bit, then 32-bit floats),
  :data:`IMAGE_BYTES_PER_PIXEL` per pixel;
- **frames**: the finished video stays in host memory (the latent buffer, the decoded float
  frames and their uint8 copy for the writer), :data:`FRAME_BYTES_PER_PIXEL` per pixel per frame.

On a GPU, weights, sampling and decoding count against the device's free memory and the rest
against the host's; on a CPU everything counts against the host's available memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLING_BYTES_PER_CELL = 64 * 1024  # fp32, per latent cell per UNet frame (measured 48-57 KiB)
DECODE_FRAMES = 8  # lookback_core.pipeline.decode_latents' frames_per_batch
DECODE_BYTES_PER_PIXEL = 3 * 1024  # fp32: a few 128-256 channel maps at full resolution
FRAME_BYTES_PER_PIXEL = 4 * 3 + 4 * 3 + 3  # float frames, their permuted copy, uint8 for the writer
IMAGE_BYTES_PER_PIXEL = 3 + 4 * 3 * 2  # uint8 RGB, float32 RGB and one resized or cropped copy
HEADROOM = 0.9  # use at most this share of what is available
GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on the compute device and on the host (the same memory on a CPU)."""

    weights: int
    sampling: int
    decoding: int
    frames: int
    files: int
    image: int = 0

    @property
    def device_bytes(self) -> int:
        return self.weights + self.sampling + self.decoding

    @property
    def host_bytes(self) -> int:
        return self.frames + self.files + self.image

    def describe(self) -> str:
        parts = {
            "weights": self.weights,
            "sampling": self.sampling,
            "decoding": self.decoding,
            "finished frames": self.frames,
            "reading the files": self.files,
            "the start image": self.image,
        }
        return ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in parts.items())


def estimate_generate(
    *,
    width: int,
    height: int,
    frames: int,
    frames_at_once: int,
    guidance: bool,
    parameters: int,
    file_bytes: int,
    dtype: torch.dtype,
    image_pixels: int = 0,
) -> MemoryEstimate:
    """The estimate for ``frames`` frames of ``width`` x ``height``, ``frames_at_once`` in the UNet at a time.

    ``parameters``: tensor elements of the checkpoint and temporal weights; ``file_bytes``: their
    file sizes; ``guidance``: classifier-free guidance (cfg > 1) doubles the UNet batch;
    ``image_pixels``: the start image's own size, before it is fitted."""
    scale = torch.finfo(dtype).bits / 32
    cells = (width // 8) * (height // 8)
    pixels = width * height
    in_flight = frames_at_once * (2 if guidance else 1)
    return MemoryEstimate(
        weights=int(parameters * torch.finfo(dtype).bits / 8),
        sampling=int(in_flight * cells * SAMPLING_BYTES_PER_CELL * scale),
        decoding=int(min(DECODE_FRAMES, frames) * pixels * DECODE_BYTES_PER_PIXEL * scale),
        frames=frames * pixels * FRAME_BYTES_PER_PIXEL,
        files=file_bytes,
        image=image_pixels * IMAGE_BYTES_PER_PIXEL,
    )


# Training in fp32 with AdamW holds four numbers per trained parameter: the weight, its gradient
# and the optimizer's two moments (8-bit Adam: 2 bytes of moments).
TRAINING_BYTES_PER_PARAMETER = {"adamw": 16, "adamw_8bit": 10}


def training_shortfall(parameters: int, device: torch.device, optimizer: str = "adamw") -> str | None:
    """Why ``parameters`` trained parameters alone do not fit on ``device``, or ``None``."""
    needed = parameters * TRAINING_BYTES_PER_PARAMETER[optimizer]
    available = host_available_bytes() if device.type == "cpu" else device_available_bytes(device)
    if available is not None and needed > HEADROOM * available:
        return (
            f"training {parameters / 1e6:.0f}M parameters needs about {needed / GiB:.1f} GiB "
            f"(weights, gradients, AdamW's moments), {available / GiB:.1f} GiB of {device} memory is available"
        )
    return None


def latent_video_problem(frames: int, channels: int, height: int, width: int) -> str | None:
    """Why a float32 latent video of ``frames`` frames (and its noise mask) does not fit in the
    host's memory, or ``None``: checked before it is allocated (a node called with a huge frame count)."""
    needed = frames * (channels + 1) * height * width * 4
    available = host_available_bytes()
    if available is not None and needed > HEADROOM * available:
        return (
            f"a latent video of {frames} frames of {width}x{height} needs {needed / GiB:.1f} GiB, "
            f"{available / GiB:.1f} GiB of host memory is available"
        )
    return None


def host_available_bytes() -> int | None:
    """Memory the host can still give (Linux ``MemAvailable``; other systems: free physical pages)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; ``None`` where it cannot be asked."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def shortfall(estimate: MemoryEstimate, device: torch.device) -> str | None:
    """Why the run does not fit (naming the memory, what it needs and what is there), or ``None``."""
    host = host_available_bytes()
    if device.type == "cpu":
        needs = {"host memory": (estimate.device_bytes + estimate.host_bytes, host)}
    else:
        needs = {
            f"{device} memory": (estimate.device_bytes, device_available_bytes(device)),
            "host memory": (estimate.host_bytes, host),
        }
    for name, (needed, available) in needs.items():
        if available is not None and needed > HEADROOM * available:
            return f"needs about {needed / GiB:.1f} GiB of {name}, {available / GiB:.1f} GiB is available"
    return None


def largest_chunk_that_fits(fits: Callable[[int], bool], lowest: int, highest: int) -> int | None:
    """The largest ``n`` in ``lowest..highest`` with ``fits(n)`` (``fits`` falls as ``n`` grows), or ``None``."""
    if lowest > highest or not fits(lowest):
        return None
    while lowest < highest:
        middle = (lowest + highest + 1) // 2
        lowest, highest = (middle, highest) if fits(middle) else (lowest, middle - 1)
    return lowest
