"""Command line: ``python -m lookback_core generate|info|demo ...``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import toyworld
from .atomic import sigterm_as_exit
from .long_video import resolve_chunking
from .precision import DTYPES, dtype_named
from .sampler import InvalidSetting, SamplerSettings, check_setting, resolve_settings
from .toy import TOY_CHECKPOINT, TOY_WEIGHTS
from .toyablate import VARIANTS
from .toybuild import ToyRecipe
from .toyworld import HELD_OUT_SEED


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


def _existing_file(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag}: no such file: {path}")
    return path


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
    from .image_prep import fitted_size, image_size
    from .sd15 import utf8_problem
    from .video_io import check_video_target
    from .weights import read_temporal_header

    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        problem = utf8_problem(text)
        if problem:
            raise UsageError(f"{flag} {problem}")
    checkpoint = _existing_file("--checkpoint", args.checkpoint)
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        raise UsageError(f"--config-dir: no such folder: {args.config_dir}")
    weights = _existing_file("--weights", args.weights) if args.weights else None
    image = _existing_file("--image", args.image)
    header = read_temporal_header(weights) if weights else None
    settings, origin = _sampler_settings(args, header.recommended_sampler if header else {})
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
    from .memory import GiB, estimate_generate, largest_chunk_that_fits, shortfall
    from .sd15 import tensor_elements

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
    from .image_prep import fit_to_multiple, load_image
    from .latents import latent_scale
    from .pipeline import generate_video
    from .sd15 import encode_long_prompt, load_sd15, match_token_lengths
    from .temporal_unet import LookBackUNet
    from .video_io import write_video
    from .weights import load_lookback_unet

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
        f"sampler: {settings.steps} DDIM steps, cfg {settings.cfg_scale:g}, eta {settings.eta:g} ({plan.settings_origin})"
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


def _generate(args: argparse.Namespace) -> int:
    run_generate(args)
    return 0


SAMPLER_FLAGS = {"steps": "--steps", "cfg_scale": "--cfg", "eta": "--eta", "first_frame": "--first-frame"}


def _sampler_settings(args: argparse.Namespace, recommended: dict) -> tuple[SamplerSettings, str]:
    """Flags given by the user, else the weights file's recommended settings, else the defaults.

    Returns the settings and a phrase saying where they came from."""
    try:
        settings, used = resolve_settings(
            {k: getattr(args, k) for k in SAMPLER_FLAGS}, recommended, args.seed
        )
    except InvalidSetting as err:
        flag = SAMPLER_FLAGS.get(err.name, f"--{err.name}")
        raise UsageError(f"{flag} must be {err.expected}, got {err.value!r}") from None
    origin = (
        f"{', '.join(SAMPLER_FLAGS[k] for k in used)} as the weights file recommends" if used else "as given"
    )
    return settings, origin


def _info(args: argparse.Namespace) -> int:
    from .weights import read_temporal_header

    header = read_temporal_header(_existing_file("weights", args.weights))
    print(
        json.dumps(
            {
                "base_family": header.base_family,
                "config": json.loads(header.config.to_json()),
                "training": header.training,
                # the base VAE's scaling factor it was trained at (None: not recorded, not checked)
                "latent_scale": header.training.get("latent_scale"),
                "recommended_sampler": header.recommended_sampler,
            },
            indent=2,
        )
    )
    if header.recommended_sampler:
        flags = ", ".join(f"{SAMPLER_FLAGS[k]} {v}" for k, v in header.recommended_sampler.items())
        print(f"generate uses the recommended sampler settings ({flags}) where no flag is given")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_rules(args)
    _writable("--out", args.out, folder=True)
    run_demo(Path(args.out), clip=args.clip, rebuild=args.rebuild)
    return 0


def _recipe(args: argparse.Namespace) -> ToyRecipe:
    """The recipe the flags give (its numbers checked by ``ToyRecipe``: a ValueError naming the flag)
    and a writable ``--out``, before any work."""
    recipe = ToyRecipe(**{f.name: getattr(args, f.name) for f in fields(ToyRecipe)})
    _writable("--out", args.out, folder=True)
    return recipe


def _writable(flag: str, value: str, *, folder: bool = False) -> None:
    from .atomic import check_writable

    try:
        check_writable(Path(value).expanduser(), folder=folder)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def _toy_build(args: argparse.Namespace) -> int:
    from .toybuild import build

    build(Path(args.out), _recipe(args))
    return 0


def _toy_ablate(args: argparse.Namespace) -> int:
    from .toyablate import ablate

    ablate(Path(args.out), _recipe(args), args.variants)  # unknown variants: a ValueError before any work
    return 0


# The bounds of the numbers of toyworld eval and demo (the recipe's are ToyRecipe's), checked
# before any work.
TOY_RULES = {
    "clip": (lambda v: 0 <= v < 2**62, "0 or more (held-out clip N is seed 1000000 + N)"),
    "clips": (lambda v: 1 <= v <= 10_000, "1..10000"),
    "first_seed": (lambda v: HELD_OUT_SEED <= v < 2**63, f"{HELD_OUT_SEED} or more (held-out seeds start there)"),
    "frames": (lambda v: 2 <= v <= toyworld.MAX_FRAMES, f"2..{toyworld.MAX_FRAMES} (the object must stay inside the frame)"),
}  # fmt: skip


def _check_rules(args: argparse.Namespace) -> None:
    """The command's numbers against :data:`TOY_RULES` (those it has)."""
    for name, (valid, expected) in TOY_RULES.items():
        if hasattr(args, name) and not valid(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(args, name)}")


def _toy_eval(args: argparse.Namespace) -> int:
    from .toyeval import default_chunking, evaluate, load_toy_model, markdown_table, write_plots, write_report

    _check_rules(args)
    for name, flag in SAMPLER_FLAGS.items():
        try:
            if getattr(args, name, None) is not None:
                check_setting(name, getattr(args, name))
        except InvalidSetting as err:
            raise UsageError(f"{flag}: {err}") from None
    try:  # the counts alone; the weights' depth and horizon fill in the defaults once loaded
        resolve_chunking(args.frames, args.chunk_frames, args.context_frames, None,
                         names=("--frames", "--chunk-frames", "--context-frames"))  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.json:
        _writable("--json", args.json)
    if args.plots:
        _writable("--plots", args.plots, folder=True)
    weights = None if args.weights.lower() == "none" else _existing_file("--weights", args.weights)
    toy = load_toy_model(
        _existing_file("--checkpoint", args.checkpoint),
        weights,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        eta=args.eta,
        settings_from=TOY_WEIGHTS if weights is None and TOY_WEIGHTS.is_file() else None,
    )
    s = toy.settings
    print(
        f"{toy.description}: {args.clips} held-out clips, {s.steps} DDIM steps, cfg {s.cfg_scale:g}, eta {s.eta:g}"
    )
    try:
        chunking = default_chunking(toy, args.frames, args.chunk_frames, args.context_frames)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"{args.frames} frames, {chunking.describe()}")
    report = evaluate(toy, args.clips, first_seed=args.first_seed, frames=args.frames, chunking=chunking)
    print(markdown_table([report]))
    print("background drift per frame: " + " ".join(f"{v:.1f}" for v in report.drift_curve))
    if args.json:
        print(f"per-clip results: {write_report([report], args.json)}")
    if args.plots:
        print("plots: " + ", ".join(str(p) for p in write_plots([report], args.plots)))
    failures = report.failures()
    if failures:
        print("below the bars: " + "; ".join(failures), file=sys.stderr)
        return 1 if args.check else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lookback_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="turn one image into a video")
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
    defaults = SamplerSettings()
    recommended = "default: the weights file's recommended value, else"
    gen.add_argument("--steps", type=int, default=None, help=f"DDIM steps ({recommended} {defaults.steps})")
    gen.add_argument(
        "--cfg",
        dest="cfg_scale",
        type=float,
        default=None,
        help=f"classifier-free guidance scale; 1 disables it ({recommended} {defaults.cfg_scale})",
    )
    gen.add_argument(
        "--eta",
        type=float,
        default=None,
        help=f"DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like ({recommended} {defaults.eta})",
    )
    gen.add_argument(
        "--first-frame",
        dest="first_frame",
        choices=("clean", "noised"),
        default=None,
        help="frame 0 as the UNet sees it: clean (hybrid initialisation) or noised to each step (the paper's "
        f"add-noise strategy, for weights trained with --objective ddpm) ({recommended} {defaults.first_frame})",
    )
    gen.add_argument("--seed", type=int, default=0)
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
        help="frames of the previous chunk each chunk continues from (default: the look-back depth d)",
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
    gen.set_defaults(func=_generate)

    info = commands.add_parser("info", help="print the config and training facts of a temporal weights file")
    info.add_argument("weights")
    info.set_defaults(func=_info)

    demo = commands.add_parser(
        "demo", help="turn a held-out toy-world image into a video with the shipped toy model (offline, CPU)"
    )
    demo.add_argument("--out", default="outputs/demo", help="folder for everything the demo writes")
    demo.add_argument(
        "--clip", type=int, default=0, help="which held-out clip gives the start image (default 0)"
    )
    demo.add_argument(
        "--rebuild",
        action="store_true",
        help="first rebuild the toy model from nothing (toyworld build; about 75 min on 2 CPU cores)",
    )
    demo.set_defaults(func=_demo)

    toy = commands.add_parser(
        "toyworld", help="the toy world: rebuild the toy model, or evaluate a model on it"
    )
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    toy_build = toy_commands.add_parser("build", help="data, base model and look-back weights, from nothing")
    toy_build.add_argument("--out", required=True, help="folder for the data, the stages and the result")
    toy_build.set_defaults(func=_toy_build)
    toy_ablate = toy_commands.add_parser(
        "ablate",
        help="train and evaluate the paper's ablations on the toy world (table, ISIM plot, contact sheet)",
    )
    toy_ablate.add_argument("--out", required=True, help="folder for the data, the variants and the results")
    toy_ablate.add_argument(
        "--variants", nargs="+", default=None, metavar="NAME", help="a subset of the variants (default: all): "
        + "; ".join(f"'{name}'" for name in VARIANTS),
    )  # fmt: skip
    toy_ablate.set_defaults(func=_toy_ablate)
    for command in (toy_build, toy_ablate):
        for f in fields(ToyRecipe):
            kind = (
                {"action": argparse.BooleanOptionalAction}
                if isinstance(f.default, bool)
                else {"type": type(f.default)}
            )
            command.add_argument(
                f"--{f.name.replace('_', '-')}", dest=f.name, default=f.default, help=f"(default {f.default})", **kind
            )  # fmt: skip
    toy_eval = toy_commands.add_parser("eval", help="generate from held-out clips and report the toy metrics")
    toy_eval.add_argument(
        "--checkpoint", default=str(TOY_CHECKPOINT), help="default: the shipped toy checkpoint"
    )
    toy_eval.add_argument(
        "--weights", default=str(TOY_WEIGHTS), help="temporal weights, or 'none' for the base UNet alone"
    )
    toy_eval.add_argument("--clips", type=int, default=64, help="held-out clips to generate (default 64)")
    toy_eval.add_argument("--first-seed", type=int, default=HELD_OUT_SEED, help=f"default {HELD_OUT_SEED}")
    toy_eval.add_argument(
        "--steps", type=int, default=None, help="DDIM steps (default: the weights' recommended)"
    )
    toy_eval.add_argument(
        "--cfg", dest="cfg_scale", type=float, default=None, help="CFG scale (same default)"
    )
    toy_eval.add_argument("--eta", type=float, default=None, help="DDIM eta (same default)")
    toy_eval.add_argument(
        "--frames", type=int, default=toyworld.FRAMES,
        help=f"frames per video, 2..{toyworld.MAX_FRAMES} (default {toyworld.FRAMES})",
    )  # fmt: skip
    toy_eval.add_argument(
        "--chunk-frames", type=int, default=None, help="as generate's (default: the weights' horizon decides)"
    )
    toy_eval.add_argument("--context-frames", type=int, default=None, help="as generate's")
    toy_eval.add_argument("--json", default=None, help="also write the per-clip results here")
    toy_eval.add_argument("--plots", default=None, help="also write isim.png and drift.png into this folder")
    toy_eval.add_argument("--check", action="store_true", help="exit 1 if a figure misses its bar")
    toy_eval.set_defaults(func=_toy_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sd15 import CheckpointError
    from .video_io import VideoReadError
    from .weights import TemporalWeightsError

    try:
        with sigterm_as_exit():
            return args.func(args)
    except (UsageError, CheckpointError, TemporalWeightsError, VideoReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
