"""The look-back recurrence and the adapter: implementation choices measured side by side.

    python benchmarks/bench_recurrence.py                       # CPU quick: 64 px, 16 frames
    python benchmarks/bench_recurrence.py --size 256            # the paper's inference shape
    python benchmarks/bench_recurrence.py --device cuda --dtype fp16 --size 256 --compile

For each preset (d, k) and each SD1.5 site shape (320 channels at size/8, 640 at size/16, 1280
at size/32 and size/64), every variant computes the same thing (checked against the literal
loop before timing); the table prints the median time of each and its speed-up over the literal
per-frame loop (Algorithm 1), then, for the variants that autograd can train through, the
memory autograd keeps for backward (exact bytes, counted with saved-tensor hooks). The CFG
batch is 2 (one video). ``--compile`` adds the shipped recurrence under ``torch.compile`` and
reports its compile time separately.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.config import PRESETS, preset  # noqa: E402
from lookback_core.lookback import lookback_recurrence, lookback_reference, to_blocks  # noqa: E402
from lookback_core.precision import DTYPES  # noqa: E402

T = TypeVar("T")
TRAINABLE = ["literal loop", "shipped (per-source convs)", "concat windows"]  # autograd-safe variants
TRAIN_TIMED = [*TRAINABLE, "sliced weight per conv", "shipped, blocks sliced"]


def literal(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """Algorithm 1 as written: one concat of d frames and one d*n -> n conv per frame."""
    return lookback_reference(frames, conv.weight, conv.bias)


def shipped(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """lookback_recurrence: current term batched, one conv per existing earlier output.

    Takes the weight as the model keeps it, d contiguous blocks (``conv.blocks``, made once).
    """
    return lookback_recurrence(frames, conv.blocks, conv.bias)


def _split(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int, contiguous: bool = True):
    """The batched current-frame term and the weight part reading the d-1 window."""
    b, f, n, h, w = frames.shape
    pad = conv.weight.shape[-1] // 2
    current_weight, past = conv.weight[:, (depth - 1) * n :], conv.weight[:, : (depth - 1) * n]
    if contiguous:
        current_weight, past = current_weight.contiguous(), past.contiguous()
    current = F.conv2d(frames.flatten(0, 1), current_weight, conv.bias, padding=pad).view(b, f, n, h, w)
    return current + frames, past, pad


def buffer_views(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """One window conv per frame; outputs written into a zero-padded buffer, windows are views.

    No per-frame copy, but the zero frames before frame 0 are convolved, and the in-place
    writes rule it out under autograd.
    """
    b, f, n, h, w = frames.shape
    current, past, pad = _split(frames, conv, depth)
    buffer = frames.new_zeros(b, f + depth - 1, n, h, w)
    buffer[:, depth - 1 :] = current
    for i in range(1, f):
        window = buffer[:, i : i + depth - 1].reshape(b, (depth - 1) * n, h, w)
        buffer[:, i + depth - 1] += F.conv2d(window, past, None, padding=pad)
    return buffer[:, depth - 1 :]


def concat_windows(
    frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int, contiguous: bool = True
) -> torch.Tensor:
    """One window conv per frame on a torch.cat of the d-1 earlier outputs (autograd-safe)."""
    b, f, n, h, w = frames.shape
    current, past, pad = _split(frames, conv, depth, contiguous)
    outs = [frames.new_zeros(b, n, h, w)] * (depth - 1) + [current[:, 0]]
    for i in range(1, f):
        window = torch.cat(outs[i : i + depth - 1], dim=1)
        outs.append(current[:, i] + F.conv2d(window, past, None, padding=pad))
    return torch.stack(outs[depth - 1 :], dim=1)


def sliced_weight(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """concat_windows with the weight slices passed to every conv as non-contiguous views."""
    return concat_windows(frames, conv, depth, contiguous=False)


def sliced_blocks(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """shipped with its blocks as views into nn.Conv2d's layout (every conv copies its block)."""
    return lookback_recurrence(frames, to_blocks(conv.weight, depth), conv.bias)


def per_sample(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> torch.Tensor:
    """The shipped recurrence run once per sample (CFG halves not batched into one conv)."""
    return torch.cat([shipped(frames[i : i + 1], conv, depth) for i in range(frames.shape[0])])


def adapter_conv3d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The shipped adapter: depth-wise Conv3d on [b, n, f, h, w]."""
    return F.conv3d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])


def adapter_channels_last(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same conv with the input in channels_last_3d layout (conversion included)."""
    return adapter_conv3d(x.contiguous(memory_format=torch.channels_last_3d), weight)


def adapter_shifted_2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same depth-wise 3D conv as a sum of depth-wise 2D convs over shifted frames."""
    b, n, f, h, w = x.shape
    a = weight.shape[-1]
    frames = F.pad(x, (0, 0, 0, 0, a // 2, a // 2)).transpose(1, 2)  # [b, f+2p, n, h, w]
    out = 0
    for t in range(a):
        taps = frames[:, t : t + f].reshape(b * f, n, h, w)
        out = out + F.conv2d(taps, weight[:, :, t], padding=a // 2, groups=n)
    return out.view(b, f, n, h, w).transpose(1, 2)


def kept_for_backward(run: Callable[[], T], resident: Iterable[torch.Tensor]) -> tuple[T, int]:
    """``run()`` under autograd: its result and the bytes autograd keeps for backward.

    Exact bytes, counted with saved-tensor hooks by storage, leaving out the storages of
    ``resident`` (the inputs and weights, held anyway).
    """
    existing = {t.untyped_storage().data_ptr() for t in resident}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in existing:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(kept.values())


def saved_for_backward_mib(fn, frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> float:
    """MiB that autograd keeps for backward beyond the inputs and weights (training memory)."""
    frames = frames.detach().requires_grad_(True)
    _, kept = kept_for_backward(
        lambda: fn(frames, conv, depth), (frames, conv.weight, conv.blocks, conv.bias)
    )
    return kept / 2**20


def with_backward(fn):
    """``fn``'s forward and a backward through it, as one training step of the site."""

    def step(frames: torch.Tensor, conv: torch.nn.Conv2d, depth: int) -> None:
        with torch.enable_grad():
            fn(frames.detach().requires_grad_(True), conv, depth).sum().backward()

    return step


def timed(fn, *args, repeat: int, device: torch.device) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
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
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="pixels; site sides are size/8 .. size/64")
    p.add_argument("--batch", type=int, default=2, help="2 = one video with CFG")
    p.add_argument("--presets", default="paper,light", help=f"of {sorted(PRESETS)}")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the shipped recurrence")
    p.add_argument(
        "--train", action="store_true", help="time forward+backward of the trainable variants instead"
    )
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2  # of the largest output, for the equality check
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, {args.frames} frames, {args.size}x{args.size}")  # fmt: skip
    variants = {"literal loop": literal, "shipped (per-source convs)": shipped, "window buffer views": buffer_views,
                "concat windows": concat_windows, "sliced weight per conv": sliced_weight,
                "per sample (no CFG batch)": per_sample, "shipped, blocks sliced": sliced_blocks}  # fmt: skip
    variants = {k: v for k, v in variants.items() if not args.train or k in TRAIN_TIMED}
    step = "forward+backward" if args.train else "look-back conv"
    sites = [(320, args.size // 8), (640, args.size // 16), (1280, args.size // 32), (1280, args.size // 64)]
    totals: dict[str, float] = {}
    for name in args.presets.split(","):
        config = preset(name)
        depth, kernel = config.depth, config.kernel
        print(f"\n{name} preset (d={depth}, k={kernel}); ms per {step}, x = speed-up over the literal loop")
        print(f"{'variant':28s}" + "".join(f"{f'n={n} {s}x{s}':>22s}" for n, s in sites))
        rows: dict[str, list[str]] = {v: [] for v in variants}
        saved: dict[str, list[str]] = {v: [] for v in TRAINABLE}
        for n, side in sites:
            conv = torch.nn.Conv2d(depth * n, n, kernel, padding=kernel // 2).to(device, dtype)
            torch.nn.init.normal_(conv.weight, std=0.2 / (depth * n * kernel) ** 0.5)
            conv.blocks = torch.nn.Parameter(to_blocks(conv.weight.detach(), depth).contiguous())
            frames = torch.randn(args.batch, args.frames, n, side, side, device=device, dtype=dtype)
            with torch.no_grad():
                ref = literal(frames, conv, depth)
                scale = ref.abs().max().item()
                fns = dict(variants)
                if args.compile:
                    compiled = torch.compile(lookback_recurrence, dynamic=False)
                    start = time.perf_counter()
                    compiled(frames, conv.blocks, conv.bias)
                    print(f"  (torch.compile, n={n}: first call {time.perf_counter() - start:.1f} s)")
                    fns["shipped + torch.compile"] = lambda fr, c, d, fn=compiled: fn(fr, c.blocks, c.bias)
                    rows.setdefault("shipped + torch.compile", [])
                base = None
                for label, fn in fns.items():
                    torch.testing.assert_close(
                        fn(frames, conv, depth), ref, rtol=1e-2, atol=tolerance * scale
                    )
                    t = timed(
                        with_backward(fn) if args.train else fn,
                        frames,
                        conv,
                        depth,
                        repeat=args.repeat,
                        device=device,
                    )
                    base = base or t
                    totals[f"{name}/{label}"] = totals.get(f"{name}/{label}", 0.0) + t
                    rows[label].append(f"{t * 1e3:12.1f} ms x{base / t:5.2f}")
            for label in TRAINABLE:
                saved[label].append(
                    f"{saved_for_backward_mib(variants[label], frames, conv, depth):14.0f} MiB"
                )
        for label, cells in rows.items():
            print(f"{label:28s}" + "".join(f"{c:>22s}" for c in cells))
        print("training: kept for backward (beyond inputs and weights)")
        for label, cells in saved.items():
            print(f"{label:28s}" + "".join(f"{c:>22s}" for c in cells))
        total = totals[f"{name}/literal loop"]
        print(
            f"{'all four sites':28s} shipped x{total / totals[f'{name}/shipped (per-source convs)']:.2f} vs literal"
        )
        print("adapter (depth-wise 3x3x3), ms:")
        for n, side in sites:
            weight = torch.randn(n, 1, 3, 3, 3, device=device, dtype=dtype) * 0.1
            video = torch.randn(args.batch, n, args.frames, side, side, device=device, dtype=dtype)
            with torch.no_grad():
                ref = adapter_conv3d(video, weight)
                cells = []
                for label, fn in (("Conv3d", adapter_conv3d), ("channels_last_3d", adapter_channels_last),
                                  ("shifted Conv2d", adapter_shifted_2d)):  # fmt: skip
                    torch.testing.assert_close(fn(video, weight), ref, rtol=2e-2, atol=2e-2)
                    cells.append(
                        f"{label} {timed(fn, video, weight, repeat=args.repeat, device=device) * 1e3:.1f}"
                    )
            print(f"  n={n} {side}x{side}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
