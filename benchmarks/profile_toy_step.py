"""Where a toy training step's time goes: the product's training step (``lookback_loss``,
backward, AdamW on the look-back modules and the UNet, as ``toyworld build`` trains) on the
shipped toy model, profiled by ``torch.profiler`` and grouped by kind of operator; and the same
step with the first-frame anchor off and on, side by side in one run.

    python benchmarks/profile_toy_step.py                  # batch 4, 8 frames, 2 threads
    python benchmarks/profile_toy_step.py --batch 16 --steps 10

Prints one table (share of self CPU time and ms per step for each kind) and the anchor's cost;
``--json`` writes them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.latents import encode_latents  # noqa: E402
from lookback_core.prompts import encode_prompt  # noqa: E402
from lookback_core.sd15 import load_sd15  # noqa: E402
from lookback_core.temporal_unet import create_lookback_unet  # noqa: E402
from lookback_core.weights import read_temporal_header  # noqa: E402
from toyworld import world  # noqa: E402
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS  # noqa: E402
from training.objective import lookback_loss  # noqa: E402

# operator name fragments -> kind, first match wins (aten names as the CPU profiler reports them)
KINDS = [
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("conv2d", "conv3d", "convolution", "mkldnn_convolution")),
    ("attention and matmul", ("bmm", "matmul", "linear", "addmm", "mm", "softmax", "scaled_dot_product")),
    ("normalisation", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    (
        "copies and layout",
        ("copy_", "contiguous", "cat", "stack", "clone", "to", "permute", "view", "reshape"),
    ),
]


def kind_of(name: str) -> str:
    short = name.removeprefix("aten::")
    for kind, fragments in KINDS:
        if any(f in short for f in fragments):
            return kind
    return "elementwise and other"


def batch(components, size: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips = [world.make_clip(s) for s in range(size)]
    pixels = (
        torch.stack([torch.from_numpy(c.frames[:frames]).permute(0, 3, 1, 2) for c in clips]).float() / 127.5
        - 1
    )
    with torch.no_grad():
        latents = encode_latents(components.vae, pixels.flatten(0, 1)).unflatten(0, (size, frames))
        text = encode_prompt(components.tokenizer, components.text_encoder, [c.caption for c in clips], "cpu")
    return latents.permute(0, 2, 1, 3, 4).contiguous(), text


def step_fn(components, anchor: bool):
    config = dataclasses.replace(
        read_temporal_header(TOY_WEIGHTS).config, first_frame_anchor=anchor, channels={}
    )
    model = create_lookback_unet(components.unet, config)
    model.unet.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    generator = torch.Generator().manual_seed(0)

    def step(latents: torch.Tensor, text: torch.Tensor) -> None:
        loss = lookback_loss(model, latents, text, scheduler, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def timed(step, latents, text, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(latents, text)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps per configuration (after 2 warm-up)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not (
        1 <= args.batch <= 256 and 2 <= args.frames <= world.FRAMES and args.steps >= 1 and args.threads >= 1
    ):
        parser.error(f"--batch 1..256, --frames 2..{world.FRAMES}, --steps >= 1 and --threads >= 1")
    torch.set_num_threads(args.threads)
    components = load_sd15(TOY_CHECKPOINT)
    latents, text = batch(components, args.batch, args.frames)

    seconds = {}
    for anchor in (False, True):
        model, step = step_fn(components, anchor)
        timed(step, latents, text, 2)  # warm-up
        seconds[anchor] = timed(step, latents, text, args.steps)
        if anchor:  # profile the shipped configuration
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step(latents, text)
        model.detach()

    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[kind_of(event.key)] = totals.get(kind_of(event.key), 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    print(
        f"toy training step: batch {args.batch}, {args.frames} frames, {args.threads} threads, backbone trained"
    )
    print("| kind | share | ms per step |\n|---|---|---|")
    for kind, micros in rows:
        print(f"| {kind} | {100 * micros / whole:.0f}% | {micros / 1000 / args.steps:.0f} |")
    cost = seconds[True] / seconds[False]
    print(
        f"step without the first-frame anchor {seconds[False] * 1000:.0f} ms, with it {seconds[True] * 1000:.0f} ms "
        f"({cost:.2f}x); {seconds[True] * 1000 / args.batch:.0f} ms a sample"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch": args.batch, "frames": args.frames, "threads": args.threads,
            "kinds_ms_per_step": {k: round(v / 1000 / args.steps, 1) for k, v in rows},
            "step_s": {"no_anchor": seconds[False], "anchor": seconds[True]},
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
