"""Peak memory of one denoising step as the number of frames grows (16, 32, 48, 64).

    python benchmarks/bench_memory_frames.py --size 64                 # CPU quick shape
    python benchmarks/bench_memory_frames.py --device cuda --dtype fp16 --size 256

Each point runs in a fresh process (bench_unet_step.py --one). Memory should grow linearly in
the frame count; the growth per added frame stays constant when it does. On a GPU the last
column says whether the point fits ``--budget-gib`` (12 by default) with the CUDA context
counted. For long videos in constant memory, see lookback_core.long_video (chunked sampling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STEP = Path(__file__).with_name("bench_unet_step.py")
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context takes on top of the allocator, counted against the budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", default="16,32,48,64")
    p.add_argument("--configs", default="base,light")
    p.add_argument("--budget-gib", type=float, default=12.0, help="GPU only: print whether each point fits")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    memory = "peak GiB (GPU, reserved)" if gpu else "peak RSS GiB"
    print(f"one CFG step (memory only), {args.size}x{args.size}, {args.dtype}, {args.device}")
    print(f"{'config':15s} {'frames':>6s} {memory:>24s} {'GiB/extra frame':>16s}"
          + (f" {f'fits {args.budget_gib:g} GiB':>14s}" if gpu else ""))  # fmt: skip
    for name in args.configs.split(","):
        previous = None
        for frames in (int(f) for f in args.frames.split(",")):
            cmd = [sys.executable, str(STEP), "--one", name, "--device", args.device, "--dtype", args.dtype,
                   "--frames", str(frames), "--size", str(args.size), "--repeat", "0"]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:  # out of memory ends the sweep of this config
                reason = "out of memory" if "out of memory" in result.stderr.lower() else result.stderr[-300:]
                print(f"{name:15s} {frames:6d} {'failed: ' + reason:>24s}")
                break
            peak = json.loads(result.stdout.splitlines()[-1])["peak_gib"]
            slope = "" if previous is None else f"{(peak - previous[1]) / (frames - previous[0]):.4f}"
            fits = ""
            if gpu:
                fits = f" {'yes' if peak + CUDA_CONTEXT_GIB <= args.budget_gib else 'no':>14s}"
            print(f"{name:15s} {frames:6d} {peak:24.2f} {slope:>16s}{fits}")
            previous = (frames, peak)


if __name__ == "__main__":
    main()
