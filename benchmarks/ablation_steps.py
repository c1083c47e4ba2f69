"""The ablation's training step, variant by variant, side by side in one quiet process
(``python benchmarks/ablation_steps.py``): the step times and parameter counts that
docs/ablation.md compares. The study's own trainings run two at a time and share the machine, so
their logged step times are not compared across variants; these are.

Each variant of ``toyworld ablate``'s study is built as its trainer flags build it (with the toy
build's preset) on the shipped toy base, and the product's training step (``lookback_loss``,
backward, AdamW on the look-back modules and the UNet; the full-clip phase's text tower, the same
for every variant, is left out) is timed at the study's two phases' shapes (batch 4: 8 frames,
then 16), the variants taken in turns so a slow spell of the machine falls on all of them alike. Prints one table: trainable temporal parameters, median ms per step at
each shape, and each ratio to the paper's look-back.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profile_toy_step import batch  # noqa: E402
from lookback_core.sd15 import load_sd15  # noqa: E402
from lookback_core.temporal_unet import create_lookback_unet, temporal_parameter_count  # noqa: E402
from toyworld import world  # noqa: E402
from toyworld.ablate import REFERENCE, STUDY, VARIANTS  # noqa: E402
from toyworld.build import ToyRecipe  # noqa: E402
from toyworld.model import TOY_CHECKPOINT  # noqa: E402
from training.args import build_parser, module_config  # noqa: E402
from training.objective import lookback_loss  # noqa: E402


def variant_config(name: str, preset: str):
    """The look-back modules the trainer builds for variant ``name``'s flags."""
    modules, _ = VARIANTS[name]
    args = build_parser().parse_args(
        [
            "--pretrained_model",
            "-",
            "--output_dir",
            "-",
            "--train_data_dir",
            "-",
            "--preset",
            preset,
            *modules,
        ]
    )
    return module_config(args)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=ToyRecipe().lookback_batch_size)
    parser.add_argument("--frames", type=int, nargs="+", default=[ToyRecipe().lookback_frames, world.FRAMES])
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed steps per variant and shape (after 1 warm-up)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=[v for v in STUDY if VARIANTS[v] is not None])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    components = load_sd15(TOY_CHECKPOINT)
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    preset = ToyRecipe().preset
    print(f"toy training step: batch {args.batch}, frames {args.frames}, {args.threads} threads, backbone trained, "
          f"torch {torch.__version__}, median of {args.rounds}")  # fmt: skip
    results: dict[str, dict] = {}
    for frames in args.frames:
        latents, text = batch(components, args.batch, frames)
        steps = {}
        for name in args.variants:
            config = variant_config(name, preset)
            model = create_lookback_unet(copy.deepcopy(components.unet), config)  # each its own UNet
            model.unet.requires_grad_(True)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            generator = torch.Generator().manual_seed(0)

            def step(
                model=model, optimizer=optimizer, generator=generator, latents=latents, text=text
            ) -> float:
                started = time.perf_counter()
                lookback_loss(model, latents, text, scheduler, generator).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return time.perf_counter() - started

            step()  # warm-up
            steps[name] = step
            results.setdefault(name, {"parameters": temporal_parameter_count(components.unet, config)})
        times: dict[str, list[float]] = {name: [] for name in args.variants}
        for _ in range(args.rounds):  # in turns
            for name, step in steps.items():
                times[name].append(step())
        for name in steps:
            results[name][frames] = statistics.median(times[name]) * 1000
    reference = results.get(REFERENCE)
    header = "| variant | temporal parameters | " + " | ".join(
        f"ms per step, {f} frames" for f in args.frames
    )
    print(header + " |\n|---|---|" + "---|" * len(args.frames))
    for name, row in results.items():
        cells = [
            f"{row[f]:.0f}" + (f" ({row[f] / reference[f]:.2f}x)" if reference else "") for f in args.frames
        ]
        print(f"| {name} | {row['parameters'] / 1e6:.2f} M | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
