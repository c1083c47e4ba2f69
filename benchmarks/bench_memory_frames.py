"""Peak memory of one denoising step as the number of frames grows (16, 32, 48, 64).

    python benchmarks/bench_memory_frames.py --size 64                 # CPU quick shape
    python benchmarks/bench_memory_frames.py --device cuda --dtype fp16 --size 256

Each point runs in a fresh process (bench_unet_step.py --one). Memory should grow linearly in
the frame count; the last column is the growth per added frame, which stays constant when it
does. For long videos in constant memory, see lookback_core.long_video (chunked sampling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STEP = Path(__file__).with_name("bench_unet_step.py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", default="16,32,48,64")
    p.add_argument("--configs", default="base,light")
    args = p.parse_args()
    print(f"peak memory of one CFG step, {args.size}x{args.size}, {args.dtype}, {args.device}")
    print(f"{'config':15s} {'frames':>6s} {'peak GiB':>9s} {'GiB/extra frame':>16s}")
    for name in args.configs.split(","):
        previous = None
        for frames in (int(f) for f in args.frames.split(",")):
            cmd = [sys.executable, str(STEP), "--one", name, "--device", args.device, "--dtype", args.dtype,
                   "--frames", str(frames), "--size", str(args.size), "--repeat", "1"]  # fmt: skip
            row = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            )
            slope = (
                ""
                if previous is None
                else f"{(row['peak_gib'] - previous[1]) / (frames - previous[0]):16.4f}"
            )
            print(f"{name:15s} {frames:6d} {row['peak_gib']:9.2f} {slope}")
            previous = (frames, row["peak_gib"])


if __name__ == "__main__":
    main()
