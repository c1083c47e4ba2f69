"""Command-line options of the trainer, named as in the diffusers training examples.

Defaults follow the paper's recipe: SD1.5 frozen, 256x256 centre crop, 32 frames at stride 4,
lr 1e-4, batch 4 with 4 gradient-accumulation steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lookback_core.atomic import file_problem
from lookback_core.config import PRESETS, LookBackConfig, preset
from lookback_core.prompts import utf8_problem
from lookback_core.rules import NUMBERS
from lookback_core.sampler import SETTING_RULES
from lookback_core.weights import check_chunking, check_recommended_sampler, read_temporal_header
from training import checkpoints
from training.dataset_config import DatasetSpec, from_flags, read_dataset_config
from training.objective import OBJECTIVES, TIMESTEP_BIAS_STRATEGIES
from training.run_config import expand_config

REPORT_TO = ("tensorboard", "wandb", "all", "none")
DEFAULT_PRESET = "paper"  # the look-back modules when neither --preset nor --init_lookback_weights is given


# the data flags' values when no --dataset_config is given (None until then: a dataset config and
# these flags are one or the other)
DATA_DEFAULTS = {"resolution": 256, "num_frames": 32, "frame_stride": 4, "video_extension": ".mp4"}
DATA_FLAGS = (
    "train_data_dir",
    "csv",
    "video_extension",
    "resolution",
    "num_frames",
    "frame_stride",
    "reference_fps",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/train.py",
        description="Train look-back temporal modules on a frozen SD1.5 (accelerate launch for multi-GPU).",
    )
    p.add_argument(
        "--config", default=None, metavar="RUN.toml",
        help="take the flags from this TOML file, by name without the dashes, at its top level or in the table "
        "of their group ([model], [data], [optimisation], [output]); flags given here override it "
        "(training/configs/ holds examples; docs/training.md#config-files)",
    )  # fmt: skip
    model = p.add_argument_group("model")
    model.add_argument(
        "--pretrained_model", required=True, help="SD1.5 single-file checkpoint (.safetensors or .ckpt)"
    )
    model.add_argument(
        "--config_dir", default=None, help="diffusers config folder (default: the shipped SD1.5 configs)"
    )
    model.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"look-back module preset (default: {DEFAULT_PRESET})",
    )
    model.add_argument(
        "--lookback_depth", type=int, default=None, help="look-back depth d (default: the preset's)"
    )
    model.add_argument(
        "--no_lookback_conv", action="store_true", help="no look-back conv: the adapter alone (an ablation)"
    )
    model.add_argument("--no_adapter", action="store_true", help="no 3D adapter (an ablation)")
    model.add_argument(
        "--no_channel_mix",
        action="store_true",
        help="no 1x1 channel mix after the look-back conv (an ablation)",
    )
    model.add_argument(
        "--temporal_attention", default=None, choices=("full", "causal"),
        help="an AnimateDiff-style temporal attention module at every site too, after the rest (the ablation's "
        "alternative to the look-back; with --no_lookback_conv --no_adapter --no_channel_mix, alone): full = every "
        "frame sees the clip, causal = the frames before it only (default: none)",
    )  # fmt: skip
    model.add_argument(
        "--causal_adapter", action="store_true",
        help="the adapter pads only past frames, so no site sees a later frame (default: centred, the paper's)",
    )  # fmt: skip
    model.add_argument(
        "--first_frame_anchor", action="store_true",
        help="every look-back conv also reads frame 0's input at its site, so each frame is one hop from the "
        "given image (beyond the paper)",
    )  # fmt: skip
    model.add_argument(
        "--init_lookback_weights", default=None, metavar="PATH",
        help="start the temporal modules from this look-back weights file (fine-tuning, or training on from "
        "another run's weights) instead of from zero; the modules are the file's, so leave out --preset, "
        "--lookback_depth and the ablation flags",
    )  # fmt: skip
    model.add_argument(
        "--train_backbone", action="store_true",
        help="also train the SD1.5 UNet (default: frozen); the trained UNet is written with the base's VAE and "
        "text encoder as <output_dir>/base_checkpoint.safetensors, to use with the temporal weights",
    )  # fmt: skip
    model.add_argument(
        "--train_text_encoder", action="store_true",
        help="with --train_backbone, also train the CLIP text encoder (default: frozen), which then goes into "
        "<output_dir>/base_checkpoint.safetensors too. A text encoder trained on still images may never have "
        "needed the motion words of a caption; the clips teach it. Captions are encoded at every step (the "
        "cache keeps the latents only)",
    )  # fmt: skip

    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset_config", default=None,
        help="a TOML file of one or more datasets, each with its own resolutions, frame counts, stride, repeats "
        "and captions, trained in aspect-ratio and frame-count buckets (docs/training.md#dataset-configs); "
        "instead of the seven flags below, --train_data_dir to --reference_fps",
    )  # fmt: skip
    data.add_argument(
        "--train_data_dir",
        help="folder of videos (+ .txt captions) or of frame folders; WebVid root with --csv",
    )
    data.add_argument("--csv", default=None, help="WebVid-style CSV with columns videoid,name,page_dir")
    data.add_argument("--video_extension", help="file extension of WebVid videos (default .mp4)")
    data.add_argument(
        "--resolution",
        type=int,
        help=f"square training size (centre crop; default {DATA_DEFAULTS['resolution']})",
    )
    data.add_argument(
        "--num_frames", type=int,
        help=f"frames per clip, including the conditioning frame (default {DATA_DEFAULTS['num_frames']})",
    )  # fmt: skip
    data.add_argument(
        "--frame_stride", type=int, help=f"take every N-th frame (default {DATA_DEFAULTS['frame_stride']})"
    )
    data.add_argument(
        "--reference_fps", type=float, default=None,
        help="if set, --frame_stride is meant at this fps and is scaled to each video's fps",
    )  # fmt: skip
    data.add_argument(
        "--cache_dir", default=None,
        help="cache VAE latents and text embeddings here; filled as clips come, or first by --cache_only",
    )  # fmt: skip
    data.add_argument(
        "--cache_only", action="store_true",
        help="the cache step: encode every clip window of the data (and the empty caption, the validation prompts "
        "and images) into --cache_dir, then stop; a run of the same settings then trains from the cache without "
        "loading the VAE encoder or the text encoder (docs/training.md#the-cache-step)",
    )  # fmt: skip
    data.add_argument(
        "--cache_clips_per_video", type=int, default=1,
        help="with --cache_dir: clip windows cached per video and resolution and frame count; epoch e takes "
        "window (e + i) %% N of item i (default 1: the centre clip)",
    )  # fmt: skip
    data.add_argument(
        "--cache_windows", choices=("spread", "random"), default="spread",
        help="the windows' starts: spread evenly over the video, or drawn once from --seed (default spread)",
    )  # fmt: skip
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=int, default=4, help="clips per device per step")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=4)
    opt.add_argument("--learning_rate", type=float, default=1e-4, help="of the temporal modules")
    opt.add_argument(
        "--backbone_learning_rate", type=float, default=None,
        help="of the SD1.5 UNet with --train_backbone (default: --learning_rate). Zero-initialised modules "
        "must grow weights of order 1 to carry a frame forward, which a higher rate than the backbone's speeds up",
    )  # fmt: skip
    opt.add_argument(
        "--text_encoder_learning_rate", type=float, default=None,
        help="of the text encoder with --train_text_encoder (default: the backbone's)",
    )  # fmt: skip
    opt.add_argument(
        "--scale_lr", action="store_true", help="multiply lr by batch x accumulation x processes"
    )
    opt.add_argument(
        "--lr_scheduler", default="constant", help="constant, linear, cosine, constant_with_warmup, ..."
    )
    opt.add_argument("--lr_warmup_steps", type=int, default=0)
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=1e-2)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit, if installed")
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    opt.add_argument(
        "--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs"
    )
    opt.add_argument("--num_train_epochs", type=int, default=1)
    opt.add_argument(
        "--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate config"
    )
    opt.add_argument(
        "--gradient_checkpointing", default="none", choices=("none", "sites", "unet", "all"),
        help="recompute look-back modules (sites), UNet blocks (unet), or both in the backward pass",
    )  # fmt: skip
    opt.add_argument(
        "--use_ema", action="store_true", help="keep an EMA of the trained weights and deploy it"
    )
    opt.add_argument("--ema_decay", type=float, default=0.9999)
    opt.add_argument(
        "--text_dropout", type=float, default=0.1, help="probability of an empty prompt (for CFG)"
    )
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument(
        "--objective", default="hybrid", choices=OBJECTIVES,
        help="hybrid: frame 0 clean, loss on frames 1.. (the paper's); ddpm: every frame noised and in the "
        "loss, for the add-noise sampling strategy (an ablation)",
    )  # fmt: skip

    opt.add_argument(
        "--timestep_bias_strategy", default="none", choices=TIMESTEP_BIAS_STRATEGIES,
        help="draw some training timesteps more often (as diffusers' training scripts): later = the "
        "noisiest --timestep_bias_portion, earlier = the least noisy, range = --timestep_bias_begin..end",
    )  # fmt: skip
    opt.add_argument(
        "--timestep_bias_multiplier", type=float, default=1.0,
        help="weight of the biased timesteps against the others (2: drawn twice as often; 1: no bias)",
    )  # fmt: skip
    opt.add_argument(
        "--motion_loss_weight", type=float, default=0.0,
        help="weigh the loss by 1 + this x how much a latent pixel differs from frame 0 (relative to the "
        "clip's mean): more of the loss where things move (0: the paper's plain MSE)",
    )  # fmt: skip
    opt.add_argument("--timestep_bias_portion", type=float, default=0.25, help="share of timesteps biased")
    opt.add_argument("--timestep_bias_begin", type=int, default=0, help="first biased timestep (range)")
    opt.add_argument(
        "--timestep_bias_end", type=int, default=1000, help="end of the biased timesteps (range)"
    )

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument(
        "--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps"
    )
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    out.add_argument(
        "--resume_from_checkpoint", default=None,
        help="'latest' (the newest checkpoint that loads; none yet: start at step 0) or a checkpoint folder",
    )  # fmt: skip
    out.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="delete an earlier run's checkpoints and weights in --output_dir and start over (without it, "
        "a folder holding checkpoints is only continued with --resume_from_checkpoint)",
    )  # fmt: skip
    out.add_argument(
        "--report_to", default="tensorboard", choices=REPORT_TO,
        help="the trackers the losses and settings go to, through accelerate: tensorboard (when installed), wandb "
        "(WANDB_MODE=offline to keep the run local), all (those installed) or none; "
        "<output_dir>/logs/metrics.jsonl is always written",
    )  # fmt: skip
    out.add_argument(
        "--validation_image", action="append", default=None, metavar="IMAGE",
        help="make a validation video from this image every --validation_steps; repeat for several: one grid "
        "video per validation step (validation/step-<n>.mp4) and each alone (validation/step-<n>/), ISIM for each",
    )  # fmt: skip
    out.add_argument(
        "--validation_prompt", action="append", default=None, metavar="PROMPT",
        help="the prompt of each --validation_image, in their order (one: every image's; default: empty)",
    )  # fmt: skip
    out.add_argument(
        "--validation_at_start", action="store_true",
        help="also make the validation videos before the first step (step 0: what the untrained modules do)",
    )  # fmt: skip
    out.add_argument("--validation_steps", type=int, default=500)
    out.add_argument("--validation_frames", type=int, default=16)
    out.add_argument(
        "--horizon_frames", type=int, default=None,
        help="record in the weights the longest video, in frames, they are meant to sample in one piece: "
        "front ends sample longer ones in chunks of it unless told otherwise (default: none recorded)",
    )  # fmt: skip
    out.add_argument(
        "--context_frames", type=int, default=None,
        help="with --horizon_frames, record in the weights how many frames of the video so far each chunk "
        "past the horizon starts from (default: none recorded; front ends then use the look-back depth d)",
    )  # fmt: skip
    out.add_argument(
        "--validation_inference_steps", type=int, default=25,
        help="DDIM steps of validation videos; stored in the weights file as its recommended steps",
    )  # fmt: skip
    out.add_argument(
        "--validation_guidance_scale", type=float, default=7.5,
        help="CFG scale of validation videos; stored in the weights file as its recommended CFG scale",
    )  # fmt: skip
    out.add_argument(
        "--isim_clip_model", default=None, help="local CLIP vision model folder for the paper's ISIM"
    )
    return p


def at_least(low: float) -> tuple:
    return (lambda v: v >= low, f">= {low:g}")


# Every numeric flag, checked before anything loads (None: the flag is unset, which is allowed); the
# quantities other front ends take too are bounded by their shared rules (lookback_core.rules).
NUMBER_RULES = {
    "num_frames": NUMBERS["frames_at_once"],
    "resolution": at_least(8),
    "frame_stride": at_least(1),
    "cache_clips_per_video": at_least(1),
    "reference_fps": (lambda v: v > 0, "> 0"),
    "dataloader_num_workers": at_least(0),
    "train_batch_size": NUMBERS["batch_size"],
    "gradient_accumulation_steps": at_least(1),
    "learning_rate": NUMBERS["learning_rate"],
    "backbone_learning_rate": NUMBERS["learning_rate"],
    "text_encoder_learning_rate": NUMBERS["learning_rate"],
    "lr_warmup_steps": at_least(0),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_weight_decay": at_least(0),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "max_train_steps": at_least(1),
    "num_train_epochs": at_least(1),
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "text_dropout": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "timestep_bias_multiplier": NUMBERS["timestep_bias_multiplier"],
    "motion_loss_weight": NUMBERS["motion_loss_weight"],
    "timestep_bias_portion": NUMBERS["timestep_bias_portion"],
    "timestep_bias_begin": at_least(0),
    "timestep_bias_end": at_least(1),
    "seed": NUMBERS["training_seed"],
    "lookback_depth": NUMBERS["lookback_depth"],
    "checkpointing_steps": at_least(1),
    "checkpoints_total_limit": at_least(1),
    "validation_steps": at_least(1),
    # sampled in one piece at every validation step: bounded here, and its memory checked before the
    # models load (training.validation.check_validation_inputs)
    "validation_frames": NUMBERS["frames_at_once"],
    "horizon_frames": NUMBERS["frames_at_once"],
    "context_frames": NUMBERS["context_frames"],
    "validation_inference_steps": SETTING_RULES["steps"],
    "validation_guidance_scale": SETTING_RULES["cfg_scale"],
}


def check_number_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, rules: dict) -> None:
    """Exit through ``parser.error`` naming the first flag of ``rules`` (flag -> (test, expected))
    whose value is not finite or fails its test; unset (None) flags pass."""
    for flag, (valid, expected) in rules.items():
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and valid(value)):
            parser.error(f"--{flag} must be {expected}, got {value}")


# the flags that choose the look-back modules (the file does, with --init_lookback_weights)
MODULE_FLAGS = (
    "preset",
    "lookback_depth",
    "no_lookback_conv",
    "no_adapter",
    "no_channel_mix",
    "temporal_attention",
    "causal_adapter",
    "first_frame_anchor",
)


def module_config(args: argparse.Namespace) -> LookBackConfig:
    """The look-back modules the flags ask for: the preset, with the ablation flags applied."""
    config = preset(args.preset)
    return replace(
        config,
        depth=args.lookback_depth or config.depth,
        lookback=config.lookback and not args.no_lookback_conv,
        adapter=config.adapter and not args.no_adapter,
        channel_mix=config.channel_mix and not args.no_channel_mix,
        temporal_attention=args.temporal_attention or config.temporal_attention,
        causal_adapter=config.causal_adapter or args.causal_adapter,
        first_frame_anchor=config.first_frame_anchor or args.first_frame_anchor,
    )


def recommended_sampler(args: argparse.Namespace) -> dict[str, Any]:
    """The validation sampler settings, which the weights file records as its recommended ones
    (with ``--objective ddpm`` the add-noise strategy the model was trained for)."""
    settings = {"steps": args.validation_inference_steps, "cfg_scale": args.validation_guidance_scale}
    return settings | ({"first_frame": "noised"} if args.objective == "ddpm" else {})


def pair_validation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Give every ``--validation_image`` its prompt: ``args.validation_image`` and
    ``args.validation_prompt`` become lists of one length (none: no validation)."""
    images, prompts = args.validation_image or [], args.validation_prompt
    if prompts and not images:
        parser.error(
            "--validation_prompt is the prompt of a --validation_image; add the image or leave it out"
        )
    if prompts is None:
        prompts = [""]
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        parser.error(
            f"{len(images)} --validation_image and {len(prompts)} --validation_prompt: give one prompt per image "
            "(in their order), or one for all"
        )
    args.validation_image, args.validation_prompt = images, prompts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(expand_config(sys.argv[1:] if argv is None else argv, parser))
    check_number_flags(parser, args, NUMBER_RULES)
    if args.init_lookback_weights is not None:
        module_flags = [f"--{name}" for name in MODULE_FLAGS if getattr(args, name) not in (None, False)]
        if module_flags:
            parser.error(
                f"--init_lookback_weights takes the look-back modules from the file; leave out {', '.join(module_flags)}"
            )
    else:
        args.preset = args.preset or DEFAULT_PRESET
        if args.causal_adapter and args.no_adapter:
            parser.error(
                "--causal_adapter makes the adapter causal; with --no_adapter there is none: leave out one"
            )
        try:
            module_config(args)
        except ValueError as err:
            parser.error(str(err))
    if args.train_text_encoder and not args.train_backbone:
        parser.error(
            "--train_text_encoder needs --train_backbone: the trained text encoder is written with the trained "
            "UNet into <output_dir>/base_checkpoint.safetensors"
        )
    if args.text_encoder_learning_rate is not None and not args.train_text_encoder:
        parser.error(
            "--text_encoder_learning_rate is the rate of --train_text_encoder; add that flag or leave it out"
        )
    if args.timestep_bias_begin >= args.timestep_bias_end:
        parser.error(
            f"--timestep_bias_begin must be below --timestep_bias_end, got {args.timestep_bias_begin} and "
            f"{args.timestep_bias_end}"
        )
    try:
        check_chunking(args.horizon_frames, args.context_frames)
    except ValueError as err:
        parser.error(f"--context_frames: {err}")
    _check_data(parser, args)
    if args.cache_dir is None:
        for flag, given in (
            ("cache_only", args.cache_only),
            ("cache_clips_per_video", args.cache_clips_per_video != 1),
        ):
            if given:
                parser.error(f"--{flag} is about the latent cache: add --cache_dir")
    try:
        check_recommended_sampler(recommended_sampler(args))
    except ValueError as err:
        parser.error(f"--validation_inference_steps/--validation_guidance_scale: {err}")
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        parser.error("--report_to wandb needs the wandb package, which is not installed: pip install wandb")
    pair_validation(parser, args)
    for prompt in args.validation_prompt:
        problem = utf8_problem(prompt)
        if problem:
            parser.error(f"--validation_prompt {problem}")
    files = [(flag, getattr(args, flag)) for flag in ("pretrained_model", "init_lookback_weights", "csv")]
    for flag, value in files + [("validation_image", image) for image in args.validation_image]:
        problem = None if value is None else file_problem(value)
        if problem:  # a folder or a FIFO is said to be one
            said = f"no such file: {value}" if problem == "no such file" else f"{value} {problem}"
            parser.error(f"--{flag}: {said}")
    from lookback_core.sd15 import read_model_configs  # diffusers: imported once the flags are read

    try:  # what the files say about themselves, checked before any model loads (lookback_core.metadata)
        read_model_configs(args.pretrained_model, args.config_dir)
    except (ValueError, OSError) as err:
        parser.error(f"--pretrained_model: {err}")
    if args.init_lookback_weights is not None:
        try:
            read_temporal_header(args.init_lookback_weights)
        except ValueError as err:
            parser.error(f"--init_lookback_weights: {err}")
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        inputs = [(f"--{f}", getattr(args, f)) for f in ("pretrained_model", "init_lookback_weights")]
        inputs += [("--validation_image", image) for image in args.validation_image]
        doomed = checkpoints.inputs_inside_run(Path(args.output_dir), inputs)
        if doomed:
            parser.error(
                f"{', '.join(f'{f} {value}' for f, value in doomed)}: --overwrite_output_dir would delete it with the "
                f"earlier run in {args.output_dir}; copy it out of that folder first, or choose another --output_dir"
            )
    return args


def _check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The data: a dataset config (read and checked now) or the data flags (their defaults filled in)."""
    given = [f"--{flag}" for flag in DATA_FLAGS if getattr(args, flag) is not None]
    if args.dataset_config is not None:
        if given:
            parser.error(
                f"--dataset_config describes the data; leave out {', '.join(given)} (set them in the file, per "
                "dataset or under [general])"
            )
        try:
            read_dataset_config(args.dataset_config)
        except ValueError as err:
            parser.error(f"--dataset_config: {err}")
        return
    if args.train_data_dir is None:
        parser.error("the data: give --train_data_dir (a folder of videos) or --dataset_config (a TOML file)")
    for flag, value in DATA_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    if not Path(args.train_data_dir).is_dir():
        parser.error(f"--train_data_dir: no such folder: {args.train_data_dir}")


def datasets(args: argparse.Namespace) -> list[DatasetSpec]:
    """The run's datasets: its --dataset_config's, or the one the data flags describe."""
    return read_dataset_config(args.dataset_config) if args.dataset_config else from_flags(args)
