"""``python -m lookback_cli toyworld build``: the shipped toy model, rebuilt from nothing.

Stages, each resumable (run the same command again after an interruption):

1. data: training clips of :mod:`toyworld.world` in the trainer's video-folder layout (with
   ``every_direction``, each seed's start image also under every other caption it allows);
2. base: :mod:`toyworld.base_model` trains the tiny SD1.5-architecture VAE, text tower and UNet;
3. look-back: ``training/train.py`` (the product's trainer) trains the look-back modules on the
   clips, with ``--train_backbone``: the base only ever saw single frames, so the UNet learns,
   together with the modules, to read the motion words of the caption (the direction of a
   clip is in its caption alone). First on short clips (``lookback_frames``: a step costs half),
   then, continuing from those weights (``full_clips/``), on whole clips, the horizon that is
   generated (``full_clip_steps``): without it the object moves at a fifth of its speed;
4. decoder: :mod:`toyworld.decoder` trains the VAE's decoder further, its encoder frozen (no
   latent changes, so nothing the look-back stage learned does either: ``decoder_steps``);
5. package: the trained checkpoint (with the tuned decoder) and temporal weights as fp16; in the
   weights' metadata the chunk context (``context_frames``), the colour match (``colour_match``,
   among the recommended sampler settings) and, in ``training.toy_build``, the recipe and the
   stages' wall times (a stage that picked up an earlier run's work is named in
   ``resumed_stages`` and counts the training time that work recorded: the base's
   ``base_facts.json``, a look-back phase's step log);
6. eval: validation clips (the build's own check; reported figures come from ``toyworld eval
   --split test``), with look-back and with the base UNet alone at 16 frames, and with
   look-back at ``long_eval_frames`` as ``generate`` samples them (in chunks of the weights'
   horizon and context); ``eval.json``, ``eval.md``, ``isim.png`` and ``drift.png`` (drift per frame).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lookback_core.atomic import save_safetensors, write_text
from lookback_core.config import PRESETS
from lookback_core.rules import NUMBERS
from lookback_core.sampler import SETTING_RULES
from lookback_core.weights import TemporalWeightsError, read_temporal_header

from . import decoder, world
from .base_model import FACTS_FILE as BASE_FACTS
from .base_model import read_stage_facts
from .evaluate import EvalJob, evaluate_files, markdown_table, write_plots, write_report

REPO = Path(__file__).resolve().parents[1]
# What the build may take on 2 cores, stages and evaluation together (recorded in the weights as
# training.toy_build.wall_time_s; CI checks the shipped files against it). 90 minutes until the
# full-clip phase trained the text tower for 2000 steps: the longer budget is argued in
# docs/toyworld.md#build-time-isim-and-what-ci-checks
BUDGET_MINUTES = 180


@dataclass(frozen=True)
class ToyRecipe:
    """Every number of the toy build; the defaults are the shipped model's recipe."""

    train_clips: int = 2000
    # each seed's start image also moving every other way it allows (toyworld.world.write_dataset), so
    # the start position no longer tells the direction. Off: built with it (3000 + 600 steps, to fit
    # the day's slower machine), the model hedged between the two ways a start allows and moved less
    # (validation: docs/toyworld.md#on-clips-nothing-was-tuned-on)
    every_direction: bool = False
    vae_steps: int = 2000
    unet_steps: int = 800
    lookback_steps: int = 5000
    lookback_frames: int = 8  # frames per training clip (generation makes 16): half the cost of a step
    lookback_batch_size: int = 4
    lookback_learning_rate: float = 3e-4
    # then on whole clips (world.FRAMES), at a constant rate; 0: none. 800 before the text tower trained
    # here; 2000 the best continuation measured on validation (docs/toyworld.md#the-text-tower-trained-on-clips)
    full_clip_steps: int = 2000
    full_clip_learning_rate: float = 1e-4
    # the full-clip phase also trains the text tower (training/train.py --train_text_encoder): the base
    # trained it on single frames, where a direction word changes nothing, and the model followed the
    # start position over the words (measured by continuing the previous model on validation clips:
    # direction 0.66 -> 0.95, docs/toyworld.md#the-text-tower-trained-on-clips)
    full_clip_text_encoder: bool = True
    # the full-clip phase draws the noisiest quarter of the timesteps (where the caption decides
    # which way the object goes) this many times as often as the others; 1: uniformly
    full_clip_timestep_bias: float = 5.0
    decoder_steps: int = 250  # then the VAE's decoder alone (toyworld.decoder); 0: none
    decoder_learning_rate: float = 3e-4
    preset: str = "light"
    first_frame_anchor: bool = True  # every frame one hop from the given image (beyond the paper)
    horizon_frames: int = world.FRAMES  # recorded in the weights: generate chunks beyond it
    # recorded in the weights too: each chunk past the horizon starts from this many finished frames
    # (measured at 24 frames on 32 clips, direction: 3 frames 0.66, 4 0.84, 5 0.91, 6 0.88, 8 0.84)
    context_frames: int = 5
    # recommended in the weights: each new frame's colour statistics set to the start image's
    # (lookback_core.colour_match; measured on 32 clips, 16 frames: drift 8.6 -> 7.8)
    colour_match: str = "first_frame"
    sampler_steps: int = 25
    sampler_cfg_scale: float = 3.0
    eval_clips: int = 32  # the build's own check (validation); reported figures: toyworld eval --split test
    long_eval_frames: int = 24  # the eval's second length, sampled as generate would (in chunks)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (valid, expected) in RECIPE_RULES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not valid(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")
        if self.context_frames >= self.horizon_frames:
            raise ValueError(
                f"--context-frames must be below --horizon-frames ({self.horizon_frames}), got {self.context_frames}"
            )


def _whole(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and low <= v <= high), f"a whole number in {low}..{high}"


def _number(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, float | int) and low <= v <= high), f"a number in {low}..{high}"


# The bounds of every number of the recipe (the toy build's and ablation's flags), checked before any
# work; the upper bounds keep a typo from filling the disk or running for weeks. Quantities the
# trainer and the sampler take too are bounded by their rules (lookback_core.rules).
RECIPE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train_clips": _whole(1, 100_000),
    "vae_steps": _whole(1, 1_000_000),
    "unet_steps": _whole(1, 1_000_000),
    "lookback_steps": _whole(1, 1_000_000),
    "lookback_frames": _whole(2, world.FRAMES),  # the training clips' length
    "lookback_batch_size": NUMBERS["batch_size"],
    "lookback_learning_rate": NUMBERS["learning_rate"],
    "full_clip_steps": _whole(0, 1_000_000),
    "full_clip_learning_rate": NUMBERS["learning_rate"],
    "full_clip_timestep_bias": _number(1, 100),
    "decoder_steps": _whole(0, 1_000_000),
    "decoder_learning_rate": NUMBERS["learning_rate"],
    "preset": (lambda v: v in PRESETS, f"one of {sorted(PRESETS)}"),
    "horizon_frames": _whole(2, world.MAX_FRAMES),
    "context_frames": _whole(1, world.MAX_FRAMES - 1),
    "colour_match": SETTING_RULES["colour_match"],
    "sampler_steps": SETTING_RULES["steps"],
    "sampler_cfg_scale": SETTING_RULES["cfg_scale"],
    "eval_clips": NUMBERS["eval_clips"],
    "long_eval_frames": _whole(2, world.MAX_FRAMES),
    "seed": NUMBERS["training_seed"],
}


class StageFailed(RuntimeError):
    """A stage's own program (the base model's, the trainer) stopped with an error it has printed."""


def _run(command: list[str], threads: int | None = None, log: Path | None = None) -> None:
    """Run one stage's program; ``threads``: its torch threads (default torch's own choice); ``log``:
    a file its output is appended to instead of this process's (for programs run side by side)."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(command), *([f"> {log}"] if log else []), flush=True)
    with contextlib.ExitStack() as stack:
        output = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            output = stack.enter_context(log.open("a"))
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=output).returncode
    if returncode:
        program = command[2] if command[1] == "-m" else Path(command[1]).name
        where = f"in {log}" if log else "above"
        raise StageFailed(
            f"{program} stopped (exit status {returncode}); its message is {where}. Run the same command again to "
            "resume: the finished stages and the last checkpoint are kept"
        )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class StageTimer:
    """Wall time of each stage, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.time()
        yield
        self.seconds[f"{name}_s"] = round(time.time() - started)


def _to_fp16(source: Path, target: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Copy a safetensors file with its floating-point tensors as fp16 and its metadata (plus extras)."""
    with safe_open(source, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    return save_safetensors(tensors, target, {**metadata, **(extra_metadata or {})})


# The recipe fields each stage's files depend on: a stage's earlier files are reused only when
# they were made with the same values (each look-back phase records them in LOOKBACK_RECIPE).
BASE_FIELDS = ("train_clips", "vae_steps", "unet_steps", "seed")
# the decoder stage's own (its files depend on these and on the base stage's)
DECODER_FIELDS = ("decoder_steps", "decoder_learning_rate")
# the stages after the look-back stage alone depend on these: the decoder, the packaging, the eval
AFTER_LOOKBACK_FIELDS = (*DECODER_FIELDS, "context_frames", "colour_match", "eval_clips", "long_eval_frames")
# the second phase's alone
FULL_CLIP_FIELDS = (
    "full_clip_steps",
    "full_clip_learning_rate",
    "full_clip_text_encoder",
    "full_clip_timestep_bias",
)
LOOKBACK_RECIPE = "toy_recipe.json"
DECODER = "decoder"  # the decoder stage's folder
FULL_CLIPS = "full_clips"  # the second look-back phase's folder, inside the first's


class StageMismatch(ValueError):
    """An earlier build's files in ``--out`` were made with another recipe."""


def check_reusable(out: Path, recipe: ToyRecipe, lookback: Path) -> None:
    """Refuse, before any work, to reuse stages of ``out`` that another recipe made (the record
    would name this recipe while the files are the other's)."""
    differences = []
    data = out / "data"
    if data.is_dir():
        wanted = {
            f"{name}.mp4"
            for seed in range(recipe.train_clips)
            for name, _ in world.dataset_clips(seed, recipe.every_direction)
        }
        extra = sorted(p.name for p in data.glob("clip_*.mp4") if p.name not in wanted)
        if extra:
            differences.append(
                f"{data} holds clips this recipe does not make (--train-clips {recipe.train_clips}, "
                f"--{'' if recipe.every_direction else 'no-'}every-direction: {extra[0]}, ...)"
            )
    for folder, made, facts_name, fields in (
        (out / "base", "base.safetensors", BASE_FACTS, BASE_FIELDS),
        (out / DECODER, decoder.VAE_FILE, decoder.FACTS_FILE, BASE_FIELDS + DECODER_FIELDS),
    ):
        # a stage without complete facts is done again (prepare, decoder_stage): nothing to compare
        facts = read_stage_facts(folder / facts_name, [*fields, "seconds"])
        if (folder / made).is_file() and facts is not None:
            differences += [
                f"the {folder.name} stage was trained with {name} {facts.get(name)} (this recipe: {getattr(recipe, name)})"
                for name in fields
                if facts.get(name) != getattr(recipe, name)
            ]
    for folder, phase in (
        (lookback, "look-back stage"),
        (lookback / FULL_CLIPS, "look-back stage's full-clip phase"),
    ):
        record = folder / LOOKBACK_RECIPE
        if record.is_file():
            earlier = json.loads(record.read_text())
            differences += [
                f"the {phase} was trained with {name} {earlier.get(name)} (this recipe: {value})"
                for name, value in _lookback_fields(recipe, folder != lookback).items()
                if earlier.get(name) != value
            ]
        elif any(folder.glob("checkpoint-*")):
            differences.append(f"{folder} holds checkpoints of a build that did not record its recipe")
    if differences:
        raise StageMismatch(
            f"--out {out} holds an earlier build of another recipe: "
            + "; ".join(differences)
            + "; run with that recipe to resume it, or choose another --out"
        )


def _lookback_fields(recipe: ToyRecipe, full_clips: bool) -> dict[str, Any]:
    """The fields a look-back phase's files depend on (the first phase's: not the second's)."""
    skipped = AFTER_LOOKBACK_FIELDS + (() if full_clips else FULL_CLIP_FIELDS)
    return {k: v for k, v in asdict(recipe).items() if k not in skipped}


def step_durations(metrics: Path) -> np.ndarray:
    """Seconds between consecutive steps of the trainer's step log (``time`` per step)."""
    times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if line.strip()]
    return np.diff(np.asarray(times, dtype=np.float64))


def training_seconds(metrics: Path) -> float:
    """Wall time of a training from the trainer's step log, summed over its runs: a pause between
    an interrupted run and its resumption (a step that took over 20 times the median) counts as one
    median step."""
    steps = step_durations(metrics)
    if len(steps) == 0:
        return 0.0
    median = float(np.median(steps))
    return float(np.where(steps > 20 * median, median, steps).sum() + median)  # + the first step


def prepare(out: Path, recipe: ToyRecipe, stage: StageTimer) -> tuple[Path, list[str]]:
    """The data and base stages into ``out``; returns the base checkpoint and the stages resumed."""
    with stage("data"):
        world.write_dataset(out / "data", range(recipe.train_clips), every_direction=recipe.every_direction)
    base = out / "base" / "base.safetensors"
    resumed = []
    with stage("base"):
        # the facts are written last: without them (a kill between the two files) the stage is redone
        facts = read_stage_facts(base.parent / BASE_FACTS, [*BASE_FIELDS, "seconds"])
        if base.is_file() and facts is not None:
            print(f"{base} exists: the base stage is skipped (delete it to retrain)")
            resumed.append("base")
        else:
            if base.is_file():
                print(f"{base} has no complete {BASE_FACTS} (a build stopped before it): trained again")
            _run(
                [
                    sys.executable, "-m", "toyworld.base_model",
                    "--output_dir", str(base.parent),
                    "--train_clips", str(recipe.train_clips),
                    "--vae_steps", str(recipe.vae_steps),
                    "--unet_steps", str(recipe.unet_steps),
                    "--seed", str(recipe.seed),
                ]
            )  # fmt: skip
    return base, resumed


def lookback_phases(folder: Path, recipe: ToyRecipe) -> dict[str, Path]:
    """The look-back stage's phases (the name each is timed under -> its folder), in order."""
    return {"lookback": folder} | ({FULL_CLIPS: folder / FULL_CLIPS} if recipe.full_clip_steps else {})


def train_lookback(
    out: Path,
    base: Path,
    folder: Path,
    recipe: ToyRecipe,
    modules: tuple[str, ...] = (),
    training: tuple[str, ...] = (),
    stage: StageTimer | None = None,
    seed: int | None = None,
    threads: int | None = None,
) -> Path:
    """The look-back stage: the product's trainer on ``out``'s data, into ``folder`` (resumable),
    first on ``lookback_frames``-frame clips, then (``full_clip_steps``, into ``folder/full_clips``)
    on whole clips from those weights; returns the folder of the final weights. ``modules`` and
    ``training``: more trainer flags (the ablation's variants), those that choose the modules and
    the others (the second phase takes its modules from the first's file). A variant without the
    look-back conv has no first-frame anchor either, the anchor being part of that conv. Each
    phase records the recipe in its folder (:data:`LOOKBACK_RECIPE`) for :func:`check_reusable`
    and is timed in ``stage`` under its :func:`lookback_phases` name. ``seed``: the trainer's (default
    the recipe's, which also seeds the base stage; the ablation trains each variant with several).
    ``threads``: the trainer's torch threads, its output then appended to ``folder/train.log`` (for
    trainings run side by side; default: torch's choice, the output here)."""
    stage = stage or StageTimer()
    anchor = recipe.first_frame_anchor and not {"--no_lookback_conv", "--first_frame_anchor"} & set(modules)
    phases = lookback_phases(folder, recipe)
    with stage("lookback"):
        _train_phase(out, folder, recipe, False, seed, threads, [
            "--pretrained_model", str(base),
            "--preset", recipe.preset,
            *(["--first_frame_anchor"] if anchor else []),
            *modules,
            "--num_frames", str(recipe.lookback_frames),
            "--learning_rate", str(recipe.lookback_learning_rate),
            "--lr_scheduler", "cosine",
            "--lr_warmup_steps", str(min(100, recipe.lookback_steps // 10)),
            *training,
        ])  # fmt: skip
    if FULL_CLIPS not in phases:
        return folder
    with stage(FULL_CLIPS):
        _train_phase(out, phases[FULL_CLIPS], recipe, True, seed, threads, [
            "--pretrained_model", str(folder / "base_checkpoint.safetensors"),
            "--init_lookback_weights", str(folder / "lookback_weights.safetensors"),
            "--num_frames", str(world.FRAMES),
            "--learning_rate", str(recipe.full_clip_learning_rate),
            "--lr_scheduler", "constant",
            "--lr_warmup_steps", str(min(50, recipe.full_clip_steps // 10)),
            "--timestep_bias_strategy", "later" if recipe.full_clip_timestep_bias != 1 else "none",
            "--timestep_bias_multiplier", str(recipe.full_clip_timestep_bias),
            *(["--train_text_encoder"] if recipe.full_clip_text_encoder else []),
            *training,
        ])  # fmt: skip
    return phases[FULL_CLIPS]


def _finished(folder: Path, steps: int) -> bool:
    """Whether the trainer finished this phase in ``folder``: its deployable weights record the last
    step (the trainer writes them after the trained checkpoint, training.saver.RunSaver.export)."""
    weights = folder / "lookback_weights.safetensors"
    if not weights.is_file():
        return False
    try:
        return read_temporal_header(weights).training.get("steps") == steps
    except TemporalWeightsError:  # half-written or damaged: the trainer redoes what is needed
        return False


def _train_phase(
    out: Path,
    folder: Path,
    recipe: ToyRecipe,
    full_clips: bool,
    seed: int | None,
    threads: int | None,
    flags: list[str],
) -> None:
    steps = recipe.full_clip_steps if full_clips else recipe.lookback_steps
    if _finished(folder, steps):  # the recipe it was trained with: check_reusable, before any work
        print(f"{folder} holds this phase's weights at step {steps}: skipped")
        return
    record = folder / LOOKBACK_RECIPE
    if not record.is_file():
        fields = _lookback_fields(recipe, full_clips)
        write_text(record, json.dumps(fields, indent=2, sort_keys=True))
    _run(
        [
        sys.executable, str(REPO / "training" / "train.py"),
        "--train_data_dir", str(out / "data"),
        "--output_dir", str(folder),
        "--cache_dir", str(out / "cache"),
        "--train_backbone",
        "--resolution", str(world.SIZE),
        "--frame_stride", "1",
        "--train_batch_size", str(recipe.lookback_batch_size),
        "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(max(1, steps // 5)),
        "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest",
        "--validation_inference_steps", str(recipe.sampler_steps),
        "--validation_guidance_scale", str(recipe.sampler_cfg_scale),
        "--report_to", "none",
        "--seed", str(recipe.seed if seed is None else seed),
        "--horizon_frames", str(recipe.horizon_frames),
        *flags,
        ],
        threads,
        None if threads is None else folder / "train.log",
    )  # fmt: skip


def build(out: str | Path, recipe: ToyRecipe = ToyRecipe()) -> dict:
    """Run every stage into ``out``; returns the build record (also in the weights' metadata)."""
    out = Path(out).resolve()
    check_reusable(out, recipe, out / "lookback")
    out.mkdir(parents=True, exist_ok=True)
    stage = StageTimer()
    commit = git_commit()  # the code the stages run, before anything changes in the checkout
    base, resumed = prepare(out, recipe, stage)
    lookback = out / "lookback"
    phases = lookback_phases(lookback, recipe)
    resumed += [name for name, folder in phases.items() if any(folder.glob("checkpoint-*"))]
    final = train_lookback(out, base, lookback, recipe, stage=stage)
    trained = final / "base_checkpoint.safetensors"
    record = {
        "recipe": asdict(recipe),
        "commit": commit,
        "command": "python -m lookback_cli toyworld build",
        "base_facts": json.loads((base.parent / BASE_FACTS).read_text()),
    }
    if recipe.decoder_steps:
        folder = out / DECODER
        if (folder / decoder.VAE_FILE).is_file():
            resumed.append(DECODER)
        with stage(DECODER):
            fields = {name: getattr(recipe, name) for name in BASE_FIELDS + DECODER_FIELDS}
            record["decoder_facts"] = decoder.decoder_stage(folder, trained, fields)
        trained = decoder.with_tuned_decoder(trained, folder, folder / "checkpoint.safetensors")
    checkpoint = _to_fp16(trained, out / "sd15_toy.safetensors")
    weights_source = final / "lookback_weights.safetensors"
    with safe_open(weights_source, framework="pt") as f:
        training = json.loads((f.metadata() or {}).get("training", "{}"))
        recommended = json.loads((f.metadata() or {}).get("recommended_sampler", "{}"))
    recommended["colour_match"] = recipe.colour_match
    # the packaged checkpoint's name, which the weights' base facts name (not the trainer's output)
    training["base_checkpoint"] = checkpoint.name

    def package(record: dict) -> Path:
        training_facts = json.dumps({**training, "toy_build": record}, sort_keys=True)
        extra = {
            "training": training_facts,
            "context_frames": str(recipe.context_frames),
            "recommended_sampler": json.dumps(recommended),
        }
        return _to_fp16(weights_source, out / "lookback_toy.safetensors", extra)

    weights = package(record)
    with stage("eval"):
        print(f"evaluating on {recipe.eval_clips} validation clips: look-back at {recipe.long_eval_frames} and "
              f"{world.FRAMES} frames, the base alone at {world.FRAMES} (in 2 processes)", flush=True)  # fmt: skip
        long, *reports = evaluate_files(
            [
                EvalJob(checkpoint, weights, recipe.eval_clips, recipe.long_eval_frames),
                EvalJob(checkpoint, weights, recipe.eval_clips),
                EvalJob(checkpoint, None, recipe.eval_clips, settings_from=weights),
            ]
        )
    write_report([*reports, long], out / "eval.json")
    write_plots([reports[0], long, reports[1]], out)
    table = markdown_table(reports)
    long_table = markdown_table([long])
    long_heading = f"{recipe.long_eval_frames} frames ({long.chunking.describe()}):"
    write_text(out / "eval.md", f"{table}\n\n{long_heading}\n\n{long_table}\n")
    # a resumed stage: the earlier runs' training time, as base_facts.json or the step log recorded it
    if "base" in resumed:
        stage.seconds["base_s"] = record["base_facts"]["seconds"]
    if DECODER in resumed:
        stage.seconds[f"{DECODER}_s"] = record["decoder_facts"]["seconds"]
    for name in set(resumed) & set(phases):
        stage.seconds[f"{name}_s"] = round(training_seconds(phases[name] / "logs" / "metrics.jsonl"))
    record |= {
        "wall_time_s": {**stage.seconds, "total_s": sum(stage.seconds.values())},
        "resumed_stages": resumed,
        "eval": {k: round(v, 4) for k, v in reports[0].summary.items()},
        "eval_base": {k: round(v, 4) for k, v in reports[1].summary.items()},
        "eval_long": {k: round(v, 4) for k, v in long.summary.items()} | {"frames": recipe.long_eval_frames},
        "drift_per_frame": reports[0].drift_curve,
        "drift_per_frame_long": long.drift_curve,
        "machine": machine(),
    }
    package(record)
    print(table)
    print(long_heading)
    print(long_table)
    failures = reports[0].failures() + [f"{recipe.long_eval_frames} frames: {f}" for f in long.failures()]
    print(
        f"toy build done in {record['wall_time_s']['total_s'] / 60:.1f} min: {checkpoint} and {weights}"
        + ("" if not failures else "\nbelow the bars: " + "; ".join(failures))
    )
    return record
