"""The look-back recurrence and the adapter: implementation choices measured side by side.

    python benchmarks/bench_recurrence.py                 # CPU, fp32, SD1.5 site shapes at 256px
    python benchmarks/bench_recurrence.py --device cuda --dtype fp16

Each variant computes the same thing (checked against the literal loop before timing); the table
prints the median time of each and its ratio to the literal per-frame loop (Algorithm 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.lookback import lookback_recurrence, lookback_reference  # noqa: E402


def literal(frames, conv, depth):
    return lookback_reference(frames, conv, depth)


def split_current(frames, conv, depth):
    """The shipped implementation: current-frame term batched, d-1 window concatenated."""
    return lookback_recurrence(frames, conv.weight, conv.bias)


def buffer_view(frames, conv, depth):
    """No per-frame cat: outputs written into a zero-padded buffer, windows are views (no grad)."""
    b, f, n, h, w = frames.shape
    pad = conv.weight.shape[-1] // 2
    current = F.conv2d(frames.flatten(0, 1), conv.weight[:, (depth - 1) * n :], conv.bias, padding=pad)
    current = current.view(b, f, n, h, w) + frames
    buf = frames.new_zeros(b, f + depth - 1, n, h, w)
    past = conv.weight[:, : (depth - 1) * n]
    for i in range(f):
        window = buf[:, i : i + depth - 1].reshape(b, (depth - 1) * n, h, w)
        buf[:, i + depth - 1] = current[:, i] + F.conv2d(window, past, None, padding=pad)
    return buf[:, depth - 1 :]


def separate_convs(frames, conv, depth):
    """d-1 convs of n -> n channels, one per earlier frame, summed (no cat at all)."""
    b, f, n, h, w = frames.shape
    pad = conv.weight.shape[-1] // 2
    current = F.conv2d(frames.flatten(0, 1), conv.weight[:, (depth - 1) * n :], conv.bias, padding=pad)
    current = current.view(b, f, n, h, w) + frames
    parts = [conv.weight[:, j * n : (j + 1) * n] for j in range(depth - 1)]
    outs = []
    for i in range(f):
        y = current[:, i]
        for j in range(depth - 1):
            src = i - (depth - 1) + j
            if src >= 0:
                y = y + F.conv2d(outs[src], parts[j], None, padding=pad)
        outs.append(y)
    return torch.stack(outs, 1)


def per_sample(frames, conv, depth):
    """The shipped recurrence run once per sample (CFG halves not batched)."""
    return torch.cat([split_current(frames[i : i + 1], conv, depth) for i in range(frames.shape[0])])


def adapter_conv3d(x, weight):
    return F.conv3d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])


def adapter_shifted_2d(x, weight):
    """The same depth-wise 3D conv as a sum of depth-wise 2D convs over shifted frames."""
    b, n, f, h, w = x.shape
    a = weight.shape[-1]
    frames = F.pad(x, (0, 0, 0, 0, a // 2, a // 2)).transpose(1, 2)  # [b, f+2p, n, h, w]
    out = 0
    for t in range(a):
        taps = frames[:, t : t + f].reshape(b * f, n, h, w)
        out = out + F.conv2d(taps, weight[:, :, t], padding=a // 2, groups=n)
    return out.view(b, f, n, h, w).transpose(1, 2)


def timed(fn, *args, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="2 = one video with CFG")
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--sites", default="320x32,640x16,1280x8,1280x4", help="channels x latent side, per shape")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; b={args.batch}, f={args.frames}, "
          f"d={args.depth}, k={args.kernel}")  # fmt: skip
    variants = {"literal loop": literal, "split current (shipped)": split_current, "buffer views": buffer_view,
                "separate d-1 convs": separate_convs, "per-sample (no CFG batching)": per_sample}  # fmt: skip
    for site in args.sites.split(","):
        n, side = (int(v) for v in site.split("x"))
        conv = torch.nn.Conv2d(args.depth * n, n, args.kernel, padding=args.kernel // 2).to(device, dtype)
        torch.nn.init.normal_(conv.weight, std=0.2 / (args.depth * n * args.kernel) ** 0.5)
        frames = torch.randn(args.batch, args.frames, n, side, side, device=device, dtype=dtype)
        print(f"\nlook-back conv, n={n}, {side}x{side}:")
        with torch.no_grad():
            ref = literal(frames, conv, args.depth)
            base = None
            for name, fn in variants.items():
                scale = ref.abs().max().item()
                torch.testing.assert_close(fn(frames, conv, args.depth), ref, rtol=1e-3, atol=1e-3 * scale)
                t = timed(fn, frames, conv, args.depth, repeat=args.repeat, device=device)
                base = base or t
                print(f"  {name:30s} {t * 1e3:9.1f} ms   x{base / t:5.2f} vs literal")
        weight = torch.randn(n, 1, 3, 3, 3, device=device, dtype=dtype) * 0.1
        video = frames.transpose(1, 2).contiguous()
        with torch.no_grad():
            torch.testing.assert_close(
                adapter_shifted_2d(video, weight), adapter_conv3d(video, weight), rtol=2e-2, atol=2e-2
            )
            t3 = timed(adapter_conv3d, video, weight, repeat=args.repeat, device=device)
            t2 = timed(adapter_shifted_2d, video, weight, repeat=args.repeat, device=device)
        print(
            f"  adapter: depth-wise Conv3d {t3 * 1e3:.1f} ms, shifted depth-wise Conv2d {t2 * 1e3:.1f} ms (x{t3 / t2:.2f})"
        )


if __name__ == "__main__":
    main()
