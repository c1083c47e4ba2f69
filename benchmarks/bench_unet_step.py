"""One denoising step (a CFG-batched UNet call) of the full SD1.5 UNet: base vs look-back presets
vs diffusers' AnimateDiff UNetMotionModel, time and peak memory, side by side in one run.

    python benchmarks/bench_unet_step.py                          # CPU quick shape: 8 frames, 64 px
    python benchmarks/bench_unet_step.py --frames 16 --size 256   # the paper's inference shape
    python benchmarks/bench_unet_step.py --device cuda --dtype fp16 --frames 16 --size 256

Weights are random (costs do not depend on values). Every configuration runs in a fresh
process, so peak memory is its own: CUDA's max_memory_reserved (the allocator's peak hold,
without the ~0.5 GiB CUDA context), or the peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.config import preset  # noqa: E402
from lookback_core.precision import DTYPES  # noqa: E402
from lookback_core.sd15 import SHIPPED_CONFIG_DIR  # noqa: E402
from lookback_core.temporal_unet import create_lookback_unet  # noqa: E402

CONFIGS = ["base", "paper", "light", "light-decoder", "animatediff"]


def build(name: str, device: torch.device, dtype: torch.dtype):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR / "unet"))
    if name == "base":
        model = unet
    elif name == "animatediff":
        model = UNetMotionModel.from_unet2d(unet, MotionAdapter())
    else:
        model = create_lookback_unet(unet, preset(name))
    return model.to(device=device, dtype=dtype).eval()


def one(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args.one, device, dtype)
    b, f, side = 2, args.frames, args.size // 8  # b=2: one video with classifier-free guidance
    x = torch.randn(b, 4, f, side, side, device=device, dtype=dtype)
    ctx = torch.randn(b, 77, 768, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def step():
        with torch.no_grad():
            if args.one == "base":
                flat = x.transpose(1, 2).reshape(b * f, 4, side, side)
                model(flat, t, ctx.repeat_interleave(f, 0))
            elif args.one == "animatediff":  # takes [b, c, f, h, w] but one context per frame
                model(x, t, ctx.repeat_interleave(f, 0))
            else:
                model(x, t, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up; with --repeat 0 the only call, measured for memory alone
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":  # what the allocator held: tensors plus its cached blocks
        peak = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in model.parameters()) / 1e9
    seconds = statistics.median(times) if times else float("nan")
    return {"config": args.one, "seconds": seconds, "peak_gib": peak, "params_b": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="pixels (latents are size/8)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype,
               "--frames", str(args.frames), "--size", str(args.size), "--repeat", str(args.repeat)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            print(f"{name}: failed\n{result.stderr[-2000:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"SD1.5 UNet step, CFG batch 2, {args.frames} frames at {args.size}x{args.size}, {args.dtype}, "
          f"{device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    memory = "peak GiB (GPU)" if args.device.startswith("cuda") else "peak RSS GiB"
    print(f"{'config':15s} {'params (B)':>10s} {'step s':>9s} {'x base':>7s} {memory:>15s} {'x base':>7s}")
    base = next((r for r in rows if r["config"] == "base"), rows[0])
    for r in rows:
        print(f"{r['config']:15s} {r['params_b']:10.2f} {r['seconds']:9.2f} {r['seconds'] / base['seconds']:7.2f} "
              f"{r['peak_gib']:15.2f} {r['peak_gib'] / base['peak_gib']:7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
