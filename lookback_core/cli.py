"""Command line: ``python -m lookback_core generate|info|demo ...``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .sampler import SamplerSettings


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


def _existing_file(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag}: no such file: {path}")
    return path


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        # fp16/bf16 are slow or unsupported on CPUs: CPU paths run fp32.
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    return dev, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _generate(args: argparse.Namespace) -> int:
    from .image_prep import fit_to_multiple, load_image
    from .pipeline import generate_video
    from .sd15 import encode_prompt, load_sd15
    from .video_io import write_video
    from .weights import load_lookback_unet

    checkpoint = _existing_file("--checkpoint", args.checkpoint)
    weights = _existing_file("--weights", args.weights)
    image_path = _existing_file("--image", args.image)
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".webp"):
        raise UsageError(f"--out: the file name must end in .mp4, .gif or .webp, got {out.name!r}")
    if args.frames < 2:
        raise UsageError(f"--frames must be at least 2 (the image and one new frame), got {args.frames}")
    device, dtype = _device_and_dtype(args.device, args.dtype)

    image, message = fit_to_multiple(load_image(image_path), width=args.width, height=args.height)
    if message:
        print(message, file=sys.stderr)
    print(f"loading {checkpoint.name} and {weights.name} on {device} ({str(dtype).removeprefix('torch.')})")
    components = load_sd15(checkpoint, config_dir=args.config_dir, device=device, dtype=dtype)
    model = load_lookback_unet(weights, components.unet)
    texts = encode_prompt(
        components.tokenizer, components.text_encoder, [args.prompt, args.negative_prompt], device
    )
    positive, negative = texts[:1], texts[1:]

    if args.context_frames and not args.chunk_frames:
        raise UsageError("--context-frames needs --chunk-frames")
    if args.chunk_frames and not 1 <= (args.context_frames or 1) < args.chunk_frames:
        raise UsageError(
            f"--context-frames must be between 1 and --chunk-frames - 1 ({args.chunk_frames - 1})"
        )
    settings = SamplerSettings(steps=args.steps, cfg_scale=args.cfg, eta=args.eta, seed=args.seed)
    with tqdm(desc="denoising", unit="step") as bar:

        def advance(step: int, total: int, _estimate: torch.Tensor) -> None:
            bar.total = total
            bar.update(step - bar.n)

        frames = generate_video(
            model,
            components.vae,
            image,
            positive,
            negative,
            args.frames,
            settings,
            components.scheduler_config,
            on_step=advance,
            chunk_frames=args.chunk_frames,
            context_frames=args.context_frames,
        )
    metadata = {"lookback": json.dumps({k: str(v) for k, v in vars(args).items() if k != "func"})}
    written = write_video(frames.permute(0, 2, 3, 1), out, fps=args.fps, metadata=metadata)
    print(f"wrote {len(frames)} frames ({frames.shape[-1]}x{frames.shape[-2]}) to {written}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .weights import read_temporal_header

    config, training, family = read_temporal_header(_existing_file("weights", args.weights))
    print(
        json.dumps(
            {"base_family": family, "config": json.loads(config.to_json()), "training": training}, indent=2
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    video = run_demo(Path(args.out), steps=args.steps)
    print(f"demo done: the trained weights, the checkpoint and {video.name} are in {video.parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lookback_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="turn one image into a video")
    gen.add_argument(
        "--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors, or .ckpt)"
    )
    gen.add_argument(
        "--weights", required=True, help="look-back temporal weights (.safetensors) from training/train.py"
    )
    gen.add_argument("--image", required=True, help="the start image; it becomes frame 0")
    gen.add_argument("--prompt", default="", help="text prompt (improves quality with --cfg > 1)")
    gen.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    gen.add_argument(
        "--frames", type=int, default=16, help="frames in the video, including the image (default 16)"
    )
    gen.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    gen.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it")
    gen.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--width", type=int, default=None, help="output width (default: the image's, to a multiple of 8)"
    )
    gen.add_argument("--height", type=int, default=None, help="output height (default: the image's)")
    gen.add_argument(
        "--chunk-frames", type=int, default=None,
        help="sample longer videos in chunks of this many frames: memory stays that of one chunk",
    )  # fmt: skip
    gen.add_argument(
        "--context-frames", type=int, default=None,
        help="frames of the previous chunk each chunk continues from (default: the look-back depth d)",
    )  # fmt: skip
    gen.add_argument("--fps", type=float, default=8.0)
    gen.add_argument("--out", required=True, help="output video: .mp4, .gif or .webp")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    gen.add_argument("--config-dir", default=None, help=argparse.SUPPRESS)  # tiny test models only
    gen.set_defaults(func=_generate)

    info = commands.add_parser("info", help="print the config and training facts of a temporal weights file")
    info.add_argument("weights")
    info.set_defaults(func=_info)

    demo = commands.add_parser("demo", help="train and generate offline with a generated tiny model")
    demo.add_argument("--out", default="outputs/demo", help="folder for everything the demo writes")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sd15 import CheckpointError
    from .video_io import VideoReadError
    from .weights import TemporalWeightsError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, TemporalWeightsError, VideoReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
