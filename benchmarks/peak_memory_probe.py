"""Peak memory of one sampling run, measured in a fresh process (``python benchmarks/peak_memory_probe.py``).

Prints JSON: the resident memory before sampling and its peak during sampling, in MiB. The
peak is Linux's VmHWM, reset just before sampling (so that the import of torch and diffusers,
which can peak higher than a small run, is not counted). Used by
``tests/test_long_video.py`` and ``benchmarks/bench_memory_frames.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.config import LookBackConfig  # noqa: E402
from lookback_core.long_video import sample_long_video  # noqa: E402
from lookback_core.sampler import SamplerSettings, sample_video  # noqa: E402
from lookback_core.temporal_unet import create_lookback_unet  # noqa: E402
from lookback_core.tiny import TINY_UNET_CONFIG  # noqa: E402

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_mib() -> float:
    """Restart the peak (VmHWM) from the current resident memory, and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_mib() -> float:
    return _status_mib("VmHWM")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--chunk", type=int, default=0, help="0: one pass over all frames")
    p.add_argument("--context", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    model = create_lookback_unet(unet, LookBackConfig(depth=3, kernel=3))
    z0 = torch.randn(1, 4, args.latent, args.latent)
    ctx = torch.randn(1, 8, TINY_UNET_CONFIG["cross_attention_dim"])
    settings = SamplerSettings(steps=1, cfg_scale=2.0)
    before = reset_peak_mib()
    if args.chunk:
        sample_long_video(
            model,
            z0,
            ctx,
            ctx,
            args.frames,
            settings,
            SCHEDULER,
            chunk_frames=args.chunk,
            context_frames=args.context,
        )
    else:
        sample_video(model, z0, ctx, ctx, args.frames, settings, SCHEDULER)
    print(json.dumps({"before_mib": before, "peak_mib": peak_mib()}))


if __name__ == "__main__":
    main()
