"""The shipped toy model through ComfyUI's KSampler, sampler by sampler, beside the command line.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_toy_samplers.py --clips 16 --out docs/comfyui_samplers

Run with a Python that has ComfyUI's and this pack's requirements. Every clip (of the test split
by default: these are reported figures) goes
through the pack's nodes as a ComfyUI user runs the toy template: the own-config checkpoint
loader (ComfyUI's own MODEL, CLIP and VAE), Apply Look-Back, Look-Back Image To Video on the
clip's start image (the user's VAE), the caption and an empty negative through CLIP Text Encode,
KSampler at the weights' recommended steps and cfg with the clip's seed, VAE Decode. The same
clips through ``toyworld eval``'s code (the command line's sampler) make the first column. The
toy metrics (:mod:`toyworld.metrics`) of each are written as a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(os.environ["COMFYUI_PATH"])  # after the repo: our ``nodes`` package wins over ComfyUI's

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported

import comfy.sample  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lookback_core.sampler import SamplerSettings  # noqa: E402
from nodes.native import LookBackImageToVideo, apply_lookback, read_weights  # noqa: E402
from nodes.own_config_checkpoint import load_own_config_checkpoint  # noqa: E402
from toyworld import world  # noqa: E402
from toyworld.evaluate import evaluate, load_toy_model, markdown_table, measure, write_report  # noqa: E402
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS  # noqa: E402

SAMPLERS = [("ddim", "ddim_uniform"), ("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "normal")]


def comfyui_generator(model, clip, vae, sampler: str, scheduler: str, steps: int, cfg: float):
    """A :data:`toyworld.evaluate.ClipGenerator` that samples with ComfyUI's KSampler code path."""
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    scale = model.model.latent_format.scale_factor

    @torch.inference_mode()  # as ComfyUI's executor runs every node: no autograd graph is kept
    def generate(toy_clip: world.ToyClip, seed: int) -> tuple[np.ndarray, torch.Tensor]:
        image = torch.from_numpy(toy_clip.frames[0]).float().div(255)[None]
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(toy_clip.caption))
        (latent,) = LookBackImageToVideo().encode(vae, image, world.FRAMES)
        noise = comfy.sample.prepare_noise(latent["samples"], seed)
        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler, scheduler, positive, negative, latent["samples"],
            noise_mask=latent["noise_mask"], seed=seed, disable_pbar=True,
        )  # fmt: skip
        frames = (vae.decode(samples).float() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        return frames, rearrange(samples.float() * scale, "f c h w -> c f h w")

    return generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--split", choices=sorted(world.SPLITS), default="test", help="default: test")
    parser.add_argument("--out", default="outputs/comfyui_samplers", help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    core = load_toy_model()  # the command line's path and its recommended settings
    steps, cfg = core.settings.steps, core.settings.cfg_scale
    reports, seconds = [], {}
    started = time.time()
    reports.append(evaluate(core, args.clips, split=args.split))
    seconds[core.description] = time.time() - started
    model, clip, vae = load_own_config_checkpoint(TOY_CHECKPOINT)
    patched = apply_lookback(model, read_weights(TOY_WEIGHTS))
    for sampler, scheduler in SAMPLERS:
        name = f"ComfyUI KSampler {sampler}/{scheduler}"
        started = time.time()
        generate = comfyui_generator(patched, clip, vae, sampler, scheduler, steps, cfg)
        settings = SamplerSettings(steps=steps, cfg_scale=cfg)
        reports.append(measure(generate, name, settings, args.clips, split=args.split))
        seconds[name] = time.time() - started
    out = Path(args.out)
    write_report(reports, out.with_suffix(".json"))
    table = markdown_table(reports)
    timing = ", ".join(f"{name}: {s / args.clips:.1f} s/clip" for name, s in seconds.items())
    out.with_suffix(".md").write_text(
        f"{steps} steps, cfg {cfg}, each clip's seed as the sampler seed.\n\n"
        f"{table}\n\nTime ({torch.get_num_threads()} threads): {timing}\n"
    )
    print(table)
    print(timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
