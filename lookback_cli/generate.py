"""``python -m lookback_cli generate`` (one image to a video) and ``info`` (what a weights file holds).

Every input is checked before a model is loaded (:func:`plan_generate`), and the memory estimate
before sampling starts."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lookback_core.long_video import resolve_chunking
from lookback_core.precision import DTYPES, dtype_named
from lookback_core.rules import SAMPLER_SETTINGS
from lookback_core.sampler import InvalidSetting, SamplerSettings, resolve_settings

from .usage import UsageError, existing_file


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` and ``--dtype`` to use, checked against this machine."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device: {device!r} is not a device; use auto, cpu, cuda, cuda:1, mps ..."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch build or machine has no CUDA; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda and mps devices are supported")
    if dtype == "auto":
        # fp16/bf16 are slow or unsupported on CPUs: CPU paths run fp32.
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    return dev, dtype_named(dtype)


@dataclass(frozen=True)
class GeneratePlan:
    """A ``generate`` run with every argument checked, before anything heavy loads."""

    checkpoint: Path
    weights: Path | None
    image: Path
    out: Path
    settings: SamplerSettings
    settings_origin: str
    device: torch.device
    dtype: torch.dtype
    size: tuple[int, int]
    image_size: tuple[int, int]
    chunk_frames: int
    context_frames: int


def plan_generate(args: argparse.Namespace) -> GeneratePlan:
    """Check every ``generate`` argument (files, numbers, output, device, memory) without loading a model."""
    from lookback_core.image_prep import fitted_size, image_size
    from lookback_core.prompts import utf8_problem
    from lookback_core.sd15 import read_model_configs
    from lookback_core.video_io import check_video_target
    from lookback_core.weights import read_temporal_header

    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        problem = utf8_problem(text)
        if problem:
            raise UsageError(f"{flag} {problem}")
    checkpoint = existing_file("--checkpoint", args.checkpoint)
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        raise UsageError(f"--config-dir: no such folder: {args.config_dir}")
    read_model_configs(checkpoint, args.config_dir)  # configs it carries: checked from its header, now
    weights = existing_file("--weights", args.weights) if args.weights else None
    image = existing_file("--image", args.image)
    header = read_temporal_header(weights) if weights else None
    settings, origin = sampler_settings(args, header.recommended_sampler if header else {})
    try:
        check_video_target(args.out, fps=args.fps)
    except ValueError as err:
        flag = "--fps" if str(err).startswith("fps") else "--out"
        raise UsageError(f"{flag}: {err}") from None
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of pixels, got {value}")
    try:
        chunk, context = resolve_chunking(
            args.frames, args.chunk_frames, args.context_frames, header.config.depth if header else None,
            names=("--frames", "--chunk-frames", "--context-frames"),
            horizon=header.horizon_frames if header else None,
            context=header.context_frames if header else None,
        )  # fmt: skip
        original = image_size(image)
        size = fitted_size(*original, width=args.width, height=args.height)
    except ValueError as err:
        raise UsageError(str(err)) from None
    device, dtype = _device_and_dtype(args.device, args.dtype)
    plan = GeneratePlan(
        checkpoint,
        weights,
        image,
        Path(args.out),
        settings,
        origin,
        device,
        dtype,
        size,
        original,
        chunk,
        context,
    )
    if not args.skip_memory_check:
        _check_memory(plan, args.frames)
    return plan


def _check_memory(plan: GeneratePlan, frames: int) -> None:
    """Refuse a run whose estimated memory (:mod:`lookback_core.memory`) exceeds what is available."""
    from lookback_core.checkpoint_file import tensor_elements
    from lookback_core.memory import GiB, estimate_generate, largest_chunk_that_fits, shortfall

    files = [plan.checkpoint] + ([plan.weights] if plan.weights else [])
    parameters = sum(tensor_elements(path) for path in files)

    def estimate(frames_at_once: int):
        return estimate_generate(
            width=plan.size[0], height=plan.size[1], frames=frames, frames_at_once=frames_at_once,
            guidance=plan.settings.cfg_scale != 1, parameters=parameters,
            file_bytes=sum(path.stat().st_size for path in files), dtype=plan.dtype,
            image_pixels=plan.image_size[0] * plan.image_size[1],
        )  # fmt: skip

    needed = estimate(plan.chunk_frames)
    problem = shortfall(needed, plan.device)
    if problem is None:
        return
    fixes = []
    chunk = largest_chunk_that_fits(
        lambda n: shortfall(estimate(n), plan.device) is None, plan.context_frames + 1, plan.chunk_frames - 1
    )
    if chunk is not None:
        fixes.append(f"--chunk-frames {chunk} (sampling in the memory of {chunk} frames)")
    fixes += ["a smaller --width/--height", "fewer --frames"]
    raise UsageError(
        f"this run {problem} (estimated for {frames} frames of {plan.size[0]}x{plan.size[1]}, "
        f"{plan.chunk_frames} at a time, {str(plan.dtype).removeprefix('torch.')} on {plan.device}: "
        f"{needed.describe()}). Use {', or '.join(fixes)}; --skip-memory-check runs it anyway "
        f"(estimates are rough; {needed.device_bytes / GiB:.1f} GiB on the device)"
    )


def run_generate(args: argparse.Namespace) -> tuple[torch.Tensor, Path]:
    """``generate``: returns the frames ``[f, 3, h, w]`` in ``[0, 1]`` and the video file written."""
    from lookback_core.image_prep import fit_to_multiple, load_image
    from lookback_core.latents import latent_scale
    from lookback_core.pipeline import generate_video
    from lookback_core.prompts import encode_long_prompt, match_token_lengths
    from lookback_core.sd15 import load_sd15
    from lookback_core.temporal_unet import LookBackUNet
    from lookback_core.video_io import write_video
    from lookback_core.weights import load_lookback_unet

    plan = plan_generate(args)
    image, message = fit_to_multiple(load_image(plan.image), width=args.width, height=args.height)
    if message:
        print(message, file=sys.stderr)
    what = (
        f"{plan.checkpoint.name} and {plan.weights.name}"
        if plan.weights
        else f"{plan.checkpoint.name} (base UNet, no look-back)"
    )
    print(f"loading {what} on {plan.device} ({str(plan.dtype).removeprefix('torch.')})")
    components = load_sd15(plan.checkpoint, config_dir=args.config_dir, device=plan.device, dtype=plan.dtype)
    model = (
        load_lookback_unet(plan.weights, components.unet, latent_scale=latent_scale(components.vae))
        if plan.weights
        else LookBackUNet(components.unet, None)
    )
    texts = {}
    for flag, prompt in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        texts[flag], tokens = encode_long_prompt(
            components.tokenizer, components.text_encoder, prompt, plan.device
        )
        if texts[flag].shape[1] > components.text_encoder.config.max_position_embeddings:
            print(
                f"{flag}: {tokens} tokens, more than CLIP's 75 per sequence: encoded whole in "
                f"{texts[flag].shape[1] // components.text_encoder.config.max_position_embeddings} windows "
                "of 75 tokens, as ComfyUI does (nothing is cut)"
            )
    positive, negative = match_token_lengths(texts["--prompt"], texts["--negative-prompt"])
    settings = plan.settings
    print(
        f"sampler: {settings.steps} DDIM steps, cfg {settings.cfg_scale:g}, eta {settings.eta:g}, colour match "
        f"{settings.colour_match} ({plan.settings_origin})"
    )
    if args.chunk_frames is None and plan.chunk_frames < args.frames:
        print(
            f"sampling in chunks of {plan.chunk_frames} frames with {plan.context_frames} of context: the weights "
            f"were checked for {plan.chunk_frames} frames at once (--chunk-frames {args.frames} samples all "
            "frames in one piece)"
        )
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
            chunk_frames=plan.chunk_frames,
            context_frames=plan.context_frames,
        )
    metadata = {"lookback": json.dumps({k: str(v) for k, v in vars(args).items() if k != "func"})}
    written = write_video(frames.permute(0, 2, 3, 1), plan.out, fps=args.fps, metadata=metadata)
    print(f"wrote {len(frames)} frames ({frames.shape[-1]}x{frames.shape[-2]}) to {written}")
    return frames, written


def generate_command(args: argparse.Namespace) -> int:
    run_generate(args)
    return 0


# the sampler settings a user (or a weights file) may set; the seed is given apart
SAMPLER_FLAGS = {name: s.flag for name, s in SAMPLER_SETTINGS.items() if name != "seed"}


def add_sampler_flags(
    parser: argparse.ArgumentParser, names: tuple[str, ...], *, same_default: bool = False
) -> None:
    """Flags for the sampler settings ``names``, from the one table of settings
    (:data:`lookback_core.rules.SAMPLER_SETTINGS`: type, choices, help); each one a weights file may
    recommend defaults to None (the file's value, else the table's default). ``same_default``: say
    "as generate's" instead of repeating the defaults."""
    for name in names:
        setting = SAMPLER_SETTINGS[name]
        if name == "seed":
            parser.add_argument(setting.flag, dest=name, type=int, default=setting.default, help=setting.help)
            continue
        default = (
            "same default as generate's"
            if same_default
            else f"default: the weights file's recommended value, else {setting.default}"
        )
        kind = {"choices": setting.choices} if setting.choices else {"type": setting.kind}
        parser.add_argument(setting.flag, dest=name, default=None, help=f"{setting.help} ({default})", **kind)


def sampler_settings(args: argparse.Namespace, recommended: dict) -> tuple[SamplerSettings, str]:
    """Flags given by the user, else the weights file's recommended settings, else the defaults.

    Returns the settings and a phrase saying where they came from: "as given", "the defaults", or
    which flags were given, which recommended and which left at their defaults."""
    try:
        settings, used = resolve_settings(
            {k: getattr(args, k) for k in SAMPLER_FLAGS}, recommended, args.seed
        )
    except InvalidSetting as err:
        flag = SAMPLER_FLAGS.get(err.name, f"--{err.name}")
        raise UsageError(f"{flag} must be {err.expected}, got {err.value!r}") from None
    given = [k for k in SAMPLER_FLAGS if getattr(args, k) is not None]
    used = [k for k in SAMPLER_FLAGS if k in used]
    default = [k for k in SAMPLER_FLAGS if k not in given and k not in used]
    if len(given) == len(SAMPLER_FLAGS):
        return settings, "as given"
    if len(default) == len(SAMPLER_FLAGS):
        return settings, "the defaults"
    parts = [
        f"{', '.join(SAMPLER_FLAGS[k] for k in names)} {how}"
        for names, how in (
            (given, "as given"),
            (used, "as the weights file recommends"),
            (default, "by default"),
        )
        if names
    ]
    return settings, "; ".join(parts)


def info_command(args: argparse.Namespace) -> int:
    from lookback_core.weights import read_temporal_header

    header = read_temporal_header(existing_file("weights", args.weights))
    print(
        json.dumps(
            {
                "base_family": header.base_family,
                "config": json.loads(header.config.to_json()),
                "training": header.training,
                # the base VAE's scaling factor it was trained at (None: not recorded, not checked)
                "latent_scale": header.training.get("latent_scale"),
                "recommended_sampler": header.recommended_sampler,
                # past the horizon, generate samples in chunks starting from context_frames finished frames
                "horizon_frames": header.horizon_frames,
                "context_frames": header.context_frames,
            },
            indent=2,
        )
    )
    if header.recommended_sampler:
        flags = ", ".join(f"{SAMPLER_FLAGS[k]} {v}" for k, v in header.recommended_sampler.items())
        print(f"generate uses the recommended sampler settings ({flags}) where no flag is given")
    return 0


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """The ``generate`` command's flags, on its subparser (or a parser of its own, as the demo's)."""
    gen.add_argument(
        "--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors, or .ckpt)"
    )
    gen.add_argument(
        "--weights",
        default=None,
        help="look-back temporal weights (.safetensors) from training/train.py; without it the base "
        "UNet alone makes every frame independently (a baseline)",
    )
    gen.add_argument("--image", required=True, help="the start image; it becomes frame 0")
    gen.add_argument("--prompt", default="", help="text prompt (improves quality with --cfg > 1)")
    gen.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    gen.add_argument(
        "--frames", type=int, default=16, help="frames in the video, including the image (default 16)"
    )
    add_sampler_flags(gen, ("steps", "cfg_scale", "eta", "first_frame", "colour_match", "seed"))
    gen.add_argument(
        "--width", type=int, default=None, help="output width (default: the image's, to a multiple of 8)"
    )
    gen.add_argument("--height", type=int, default=None, help="output height (default: the image's)")
    gen.add_argument(
        "--chunk-frames", type=int, default=None,
        help="sample longer videos in chunks of this many frames: memory stays that of one chunk (default: "
        "one piece, or chunks of the weights' horizon, the frames they were checked for, beyond it)",
    )  # fmt: skip
    gen.add_argument(
        "--context-frames", type=int, default=None,
        help="frames of the previous chunk each chunk continues from (default: the number the weights record, "
        "else the look-back depth d)",
    )  # fmt: skip
    gen.add_argument("--fps", type=float, default=8.0)
    gen.add_argument("--out", required=True, help="output video: .mp4, .gif or .webp")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    gen.add_argument(
        "--skip-memory-check", action="store_true",
        help="run even when the memory estimate says the run does not fit",
    )  # fmt: skip
    gen.add_argument("--config-dir", default=None, help=argparse.SUPPRESS)  # tiny test models only
    gen.set_defaults(func=generate_command)


def parse_generate_args(argv: list[str]) -> argparse.Namespace:
    """``generate``'s flags parsed as the command line parses them."""
    parser = argparse.ArgumentParser(prog="python -m lookback_cli generate")
    add_generate_arguments(parser)
    return parser.parse_args(argv)


def add_info_command(commands: argparse._SubParsersAction) -> None:
    """The ``info`` subcommand."""
    info = commands.add_parser("info", help="print the config and training facts of a temporal weights file")
    info.add_argument("weights")
    info.set_defaults(func=info_command)
