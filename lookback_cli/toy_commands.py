"""``python -m lookback_cli demo`` and ``toyworld build|eval|ablate``: the toy world's commands
(:mod:`toyworld` does the work; here its flags are read and checked before any)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from lookback_core.long_video import resolve_chunking
from lookback_core.rules import NUMBERS, Rule, whole
from lookback_core.sampler import InvalidSetting, check_setting
from lookback_core.weights import read_temporal_header
from toyworld import world
from toyworld.ablate import STUDY, VARIANTS
from toyworld.build import StageFailed, ToyRecipe
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS

from .generate import SAMPLER_FLAGS, add_sampler_flags
from .usage import UsageError, existing_file, writable


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_rules(args)
    writable("--out", args.out, folder=True)
    run_demo(Path(args.out), clip=args.clip, rebuild=args.rebuild)
    return 0


def _recipe(args: argparse.Namespace) -> ToyRecipe:
    """The recipe the flags give (its numbers checked by ``ToyRecipe``: a ValueError naming the flag)
    and a writable ``--out``, before any work."""
    recipe = ToyRecipe(**{f.name: getattr(args, f.name) for f in fields(ToyRecipe)})
    writable("--out", args.out, folder=True)
    return recipe


def toy_build_command(args: argparse.Namespace) -> int:
    from toyworld.build import build

    try:
        build(Path(args.out), _recipe(args))
    except StageFailed as err:  # the stage has said why; no traceback of ours on top
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def toy_ablate_command(args: argparse.Namespace) -> int:
    from toyworld.ablate import ablate

    _check_rules(args)
    try:  # unknown variants, repeated seeds: a ValueError before any work
        ablate(Path(args.out), _recipe(args), args.variants, seeds=tuple(args.seeds), test_clips=args.test_clips,
               workers=args.workers)  # fmt: skip
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# The bounds of the numbers of toyworld eval and demo (the recipe's are ToyRecipe's, the sampler's
# lookback_core.rules'), checked before any work.
TOY_RULES = {
    "clip": Rule(
        lambda v: 0 <= v < 2**62,
        f"0 or more (clip N is seed {world.HELD_OUT_SEED} + N, of the validation split)",
    ),
    "clips": NUMBERS["eval_clips"],
    "test_clips": NUMBERS["eval_clips"],
    "workers": whole(1, 64),
    "frames": whole(2, world.MAX_FRAMES, "the object must stay inside the frame"),
}


def _check_rules(args: argparse.Namespace) -> None:
    """The command's numbers against :data:`TOY_RULES` (those it has)."""
    for name, rule in TOY_RULES.items():
        problem = (
            rule.problem(f"--{name.replace('_', '-')}", getattr(args, name, None))
            if hasattr(args, name)
            else None
        )
        if problem:
            raise UsageError(problem)


def toy_eval_command(args: argparse.Namespace) -> int:
    from lookback_core.sd15 import read_model_configs
    from toyworld.evaluate import (
        EvalJob,
        default_chunking,
        evaluate,
        evaluate_files,
        load_toy_model,
        markdown_table,
        write_plots,
        write_report,
    )

    _check_rules(args)
    for name, flag in SAMPLER_FLAGS.items():
        try:
            if getattr(args, name, None) is not None:
                check_setting(name, getattr(args, name))
        except InvalidSetting as err:
            raise UsageError(f"{flag}: {err}") from None
    weights = None if args.weights.lower() == "none" else existing_file("--weights", args.weights)
    header = read_temporal_header(weights) if weights is not None else None
    try:  # before the model loads: its header's depth, horizon and context fill in the defaults
        resolve_chunking(
            args.frames, args.chunk_frames, args.context_frames, header.config.depth if header else None,
            names=("--frames", "--chunk-frames", "--context-frames"),
            horizon=header.horizon_frames if header else None, context=header.context_frames if header else None,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.json:
        writable("--json", args.json)
    if args.plots:
        writable("--plots", args.plots, folder=True)
    try:
        seeds = world.split_seeds(args.split, args.clips, args.first_seed)
    except ValueError as err:
        raise UsageError(f"--split/--clips/--first-seed: {err}") from None
    checkpoint = existing_file("--checkpoint", args.checkpoint)
    read_model_configs(checkpoint)  # the configs it carries, checked before any model loads
    sampler = {
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "eta": args.eta,
        "colour_match": args.colour_match,
    }
    settings_from = TOY_WEIGHTS if weights is None and TOY_WEIGHTS.is_file() else None
    toy = load_toy_model(checkpoint, weights, settings_from=settings_from, **sampler)
    s = toy.settings
    print(
        f"{toy.description}: {args.clips} {args.split} clips (seeds {seeds[0]}..{seeds[-1]}), {s.steps} DDIM steps, "
        f"cfg {s.cfg_scale:g}, eta {s.eta:g}, colour match {s.colour_match}; {args.workers} worker(s)"
    )
    if args.split == "test":
        print(
            "the test split is for reported figures only: choose nothing on what it shows (use --split validation)"
        )
    try:
        chunking = default_chunking(toy, args.frames, args.chunk_frames, args.context_frames)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"{args.frames} frames, {chunking.describe()}")
    if args.workers == 1:
        report = evaluate(
            toy, args.clips, split=args.split, first_seed=seeds[0], frames=args.frames, chunking=chunking
        )
    else:
        del toy  # the workers load their own
        job = EvalJob(
            Path(checkpoint), weights and Path(weights), args.clips, args.frames, settings_from, args.split,
            seeds[0], sampler, args.chunk_frames, args.context_frames,
        )  # fmt: skip
        (report,) = evaluate_files([job], workers=args.workers)
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


def add_toy_commands(commands: argparse._SubParsersAction) -> None:
    """The ``demo`` and ``toyworld`` subcommands."""
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
        help="first rebuild the toy model from nothing (toyworld build; about 2.5-3 hours on 2 CPU cores)",
    )
    demo.set_defaults(func=demo_command)

    toy = commands.add_parser(
        "toyworld", help="the toy world: rebuild the toy model, or evaluate a model on it"
    )
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    toy_build = toy_commands.add_parser("build", help="data, base model and look-back weights, from nothing")
    toy_build.add_argument("--out", required=True, help="folder for the data, the stages and the result")
    toy_build.set_defaults(func=toy_build_command)
    toy_ablate = toy_commands.add_parser(
        "ablate",
        help="train and evaluate the paper's ablations on the toy world (table, ISIM plot, contact sheet)",
    )
    toy_ablate.add_argument("--out", required=True, help="folder for the data, the variants and the results")
    toy_ablate.add_argument(
        "--variants", nargs="+", default=None, metavar="NAME",
        help="the variants to train and measure (default: the study's: " + "; ".join(f"'{name}'" for name in STUDY)
        + "); the others: " + "; ".join(f"'{name}'" for name in VARIANTS if name not in STUDY),
    )  # fmt: skip
    toy_ablate.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1], metavar="SEED",
        help="training seeds: each variant is trained once per seed, for the spread (default 0 1)",
    )  # fmt: skip
    toy_ablate.add_argument(
        "--test-clips",
        type=int,
        default=64,
        help="clips of the test split each run is measured on (default 64)",
    )
    toy_ablate.add_argument(
        "--workers",
        type=int,
        default=2,
        help="trainings, then evaluation processes, run side by side with one thread each; 1: one at a time "
        "with torch's threads (default 2)",
    )
    toy_ablate.set_defaults(func=toy_ablate_command)
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
    toy_eval = toy_commands.add_parser(
        "eval", help="generate from the clips of a split and report the toy metrics with their 95% intervals"
    )
    toy_eval.add_argument(
        "--checkpoint", default=str(TOY_CHECKPOINT), help="default: the shipped toy checkpoint"
    )
    toy_eval.add_argument(
        "--weights", default=str(TOY_WEIGHTS), help="temporal weights, or 'none' for the base UNet alone"
    )
    toy_eval.add_argument(
        "--split", choices=sorted(world.SPLITS), default="validation",
        help="validation (default): where every choice is made; test: reported figures only, never a choice",
    )  # fmt: skip
    toy_eval.add_argument("--clips", type=int, default=64, help="clips to generate (default 64)")
    toy_eval.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="the first clip's seed, inside the split (default: its first)",
    )
    toy_eval.add_argument(
        "--workers", type=int, default=2, help="processes of one thread each sharing the clips (default 2)"
    )
    add_sampler_flags(toy_eval, ("steps", "cfg_scale", "eta", "colour_match"), same_default=True)
    toy_eval.add_argument(
        "--frames", type=int, default=world.FRAMES,
        help=f"frames per video, 2..{world.MAX_FRAMES} (default {world.FRAMES})",
    )  # fmt: skip
    toy_eval.add_argument(
        "--chunk-frames", type=int, default=None, help="as generate's (default: the weights' horizon decides)"
    )
    toy_eval.add_argument("--context-frames", type=int, default=None, help="as generate's")
    toy_eval.add_argument("--json", default=None, help="also write the per-clip results here")
    toy_eval.add_argument("--plots", default=None, help="also write isim.png and drift.png into this folder")
    toy_eval.add_argument("--check", action="store_true", help="exit 1 if a figure misses its bar")
    toy_eval.set_defaults(func=toy_eval_command)
