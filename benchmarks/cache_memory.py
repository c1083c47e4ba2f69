"""Memory a run from a complete latent cache saves: SD1.5 loaded with and without its VAE encoder
and text encoder, each in a fresh process (``python benchmarks/cache_memory.py --work DIR``).

A full-size SD1.5 checkpoint (the shipped configs, seeded random weights: the sizes are what
matter) is written to ``DIR`` once. Each mode loads it as the trainer does (``load_sd15``) and
prints the resident memory after loading and its peak (Linux VmRSS and VmHWM, the peak reset after
the imports); the mode with the encoders then encodes one clip and its caption, as a run without a
complete cache does at every step, and prints the peak of that too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peak_memory_probe import _status_mib, reset_peak_mib  # noqa: E402
from lookback_core.ldm_export import save_ldm_checkpoint  # noqa: E402
from lookback_core.sd15 import SHIPPED_CONFIG_DIR, load_sd15  # noqa: E402
from lookback_core.tiny import tiny_sd15_models  # noqa: E402

MODES = {"encoders loaded": True, "from a complete cache": False}


def _child(checkpoint: Path, configs: Path, encoders: bool, frames: int, size: int) -> dict:
    from lookback_core.latents import encode_latents
    from lookback_core.prompts import encode_prompt

    reset_peak_mib()
    components = load_sd15(checkpoint, config_dir=configs, vae_encoder=encoders, text_encoder=encoders)
    facts = {"loaded_mib": _status_mib("VmRSS"), "load_peak_mib": _status_mib("VmHWM")}
    if encoders:
        with torch.no_grad():
            encode_latents(components.vae, torch.rand(frames, 3, size, size) * 2 - 1)
            encode_prompt(components.tokenizer, components.text_encoder, ["a caption"], torch.device("cpu"))
        facts["encode_peak_mib"] = _status_mib("VmHWM")
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the full-size checkpoint (about 4.3 GB)")
    parser.add_argument("--frames", type=int, default=16, help="frames of the clip encoded (default 16)")
    parser.add_argument("--size", type=int, default=256, help="its square size in pixels (default 256)")
    parser.add_argument(
        "--configs",
        default=str(SHIPPED_CONFIG_DIR),
        help="diffusers-layout config folder of the model (default: SD1.5's, shipped; the tests use a tiny one)",
    )
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = Path(args.configs)
    name = "sd15_random" if configs == SHIPPED_CONFIG_DIR else f"random_{configs.resolve().name}"
    checkpoint = Path(args.work) / f"{name}.safetensors"
    if args.child:
        print(json.dumps(_child(checkpoint, configs, MODES[args.child], args.frames, args.size)))
        return
    if not checkpoint.is_file():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_ldm_checkpoint(checkpoint, *tiny_sd15_models(configs, seed=0))
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--work", args.work, "--configs", args.configs,
                   "--frames", str(args.frames), "--size", str(args.size), "--child", mode]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "frames": args.frames,
                      "size": args.size, "modes": results}, indent=2))  # fmt: skip
    full, cached = results["encoders loaded"], results["from a complete cache"]
    print(f"resident after loading: {full['loaded_mib']:.0f} MiB with the encoders, {cached['loaded_mib']:.0f} "
          f"without ({full['loaded_mib'] - cached['loaded_mib']:.0f} MiB saved); encoding one {args.frames}-frame "
          f"{args.size}x{args.size} clip peaks at {full['encode_peak_mib']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
