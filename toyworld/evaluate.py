"""``python -m lookback_cli toyworld eval``: generate from held-out toy-world start images and measure.

Each clip of a split (:data:`toyworld.world.SPLITS`: *validation* for every choice, *test* for
reported figures only) gives its first frame and its caption; the model generates a video from them with the code every front
end uses (:func:`lookback_core.pipeline.generate_latents`, the sampler settings ``generate``
would pick), and :mod:`toyworld.metrics` measures it. The ISIM curve is the paper's
measure in VAE-latent space (:mod:`lookback_core.metrics`), averaged over clips. Every average
comes with its 95% interval and the direction accuracy with its breakdown by direction
(:func:`toyworld.metrics.intervals`, :func:`toyworld.metrics.by_direction`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lookback_core.atomic import write_image, write_text
from lookback_core.image_prep import to_uint8_frames
from lookback_core.latents import latent_scale
from lookback_core.long_video import resolve_chunking
from lookback_core.metrics import isim_curve, isim_summary, latent_features
from lookback_core.pipeline import decode_latents, encode_image_latent, generate_latents
from lookback_core.prompts import encode_prompt
from lookback_core.sampler import SamplerSettings, resolve_settings
from lookback_core.sd15 import SD15Components, load_sd15
from lookback_core.temporal_unet import LookBackUNet
from lookback_core.weights import load_lookback_unet, read_temporal_header

from . import world
from .metrics import ClipMetrics, by_direction, clip_metrics, intervals, mean_drift_per_frame, summarise
from .model import TOY_CHECKPOINT, TOY_WEIGHTS
from .pictures import plot_curves

# The bars the shipped toy model must reach (test clips, generate's default settings), for
# videos of up to 16 frames and for longer ones (up to world.MAX_FRAMES).
BAR_NAMES = {
    "frame0_psnr": "frame-0 PSNR vs start image (dB)",
    "persistence": "persistence",
    "direction_accuracy": "direction accuracy",
    "speed": "mean speed along direction (px/frame)",
    "background_drift": "background drift (levels of 255)",
}
BARS_BY_LENGTH: dict[int, dict[str, tuple[float, float]]] = {
    16: {"frame0_psnr": (28.0, float("inf")), "persistence": (0.95, 1.0), "direction_accuracy": (0.9, 1.0),
         "speed": (1.7, 2.3), "background_drift": (0.0, 8.0)},
    world.MAX_FRAMES: {"frame0_psnr": (28.0, float("inf")), "persistence": (0.9, 1.0),
                          "direction_accuracy": (0.9, 1.0), "speed": (1.7, 2.3), "background_drift": (0.0, 10.0)},
}  # fmt: skip


def bars(frames: int) -> dict[str, tuple[float, float]]:
    """The bars (metric -> (low, high)) for videos of ``frames`` frames."""
    return BARS_BY_LENGTH[min(length for length in BARS_BY_LENGTH if length >= frames)]


@dataclass
class ToyModel:
    """A loaded toy model: the SD1.5 parts, the (look-back or base) UNet and its sampler settings."""

    components: SD15Components
    model: LookBackUNet
    settings: SamplerSettings
    description: str
    recommended: dict[str, Any] = field(default_factory=dict)
    horizon_frames: int | None = None  # the weights' chunking (lookback_core.weights)
    context_frames: int | None = None


def load_toy_model(
    checkpoint: str | os.PathLike = TOY_CHECKPOINT,
    weights: str | os.PathLike | None = TOY_WEIGHTS,
    *,
    steps: int | None = None,
    cfg_scale: float | None = None,
    eta: float | None = None,
    colour_match: str | None = None,
    settings_from: str | os.PathLike | None = None,
) -> ToyModel:
    """Load a checkpoint with temporal ``weights`` (``None``: the base UNet alone), on the CPU in fp32.

    Sampler settings resolve as in ``generate``: the arguments given, else the recommended
    settings of ``weights`` (or of ``settings_from``, so a base-only run can use the same
    sampler as the look-back run it is compared with), else the defaults.
    """
    components = load_sd15(checkpoint)
    source = weights if weights is not None else settings_from
    header = read_temporal_header(source) if source is not None else None
    recommended = header.recommended_sampler if header is not None else {}
    given = {"steps": steps, "cfg_scale": cfg_scale, "eta": eta, "colour_match": colour_match}
    settings, _ = resolve_settings(given, recommended, seed=0)
    if weights is not None:
        model = load_lookback_unet(weights, components.unet, latent_scale=latent_scale(components.vae))
        description = f"look-back ({Path(weights).name})"
    else:
        model = LookBackUNet(components.unet, None)
        description = "base without look-back"
    chunking = (header.horizon_frames, header.context_frames) if header is not None else (None, None)
    return ToyModel(components, model, settings, description, recommended, *chunking)


@dataclass(frozen=True)
class Chunking:
    """How a video is sampled: ``chunk_frames`` None for one piece (``context_frames`` then unused)."""

    chunk_frames: int | None = None
    context_frames: int | None = None

    def describe(self) -> str:
        if self.chunk_frames is None:
            return "one piece"
        return f"chunks of {self.chunk_frames} frames, {self.context_frames} of context"


def default_chunking(toy: ToyModel, frames: int, chunk_frames: int | None = None,
                     context_frames: int | None = None) -> Chunking:  # fmt: skip
    """The chunking ``generate`` would use for ``frames`` frames with these flags (the weights'
    horizon and context decide where none is given); raises ValueError for counts ``generate`` refuses."""
    config = toy.model.config
    chunk, context = resolve_chunking(
        frames, chunk_frames, context_frames, config.depth if config is not None else None,
        names=("--frames", "--chunk-frames", "--context-frames"), horizon=toy.horizon_frames,
        context=toy.context_frames,
    )  # fmt: skip
    return Chunking() if chunk >= frames else Chunking(chunk, context)


def generate_clip(
    toy: ToyModel, clip: world.ToyClip, seed: int, chunking: Chunking = Chunking()
) -> tuple[np.ndarray, torch.Tensor]:
    """Frames ``[f, h, w, 3]`` uint8 and latents ``[c, f, h/8, w/8]`` generated from ``clip``'s first
    frame, as long as ``clip``."""
    image = torch.from_numpy(clip.frames[0]).permute(2, 0, 1)[None].float() / 255
    texts = encode_prompt(toy.components.tokenizer, toy.components.text_encoder, [clip.caption, ""], "cpu")
    settings = replace(toy.settings, seed=seed)
    latents = generate_latents(
        toy.model,
        toy.components.vae,
        image,
        texts[:1],
        texts[1:],
        len(clip.frames),
        settings,
        toy.components.scheduler_config,
        chunk_frames=chunking.chunk_frames,
        context_frames=chunking.context_frames,
    )
    frames = to_uint8_frames(decode_latents(toy.components.vae, latents)[0])
    return frames, latents[0]


@dataclass
class EvalReport:
    """Per-clip metrics, their summary and the mean ISIM curve of one model."""

    description: str
    settings: SamplerSettings
    clips: list[ClipMetrics]
    seeds: list[int]
    isim_curve: list[float]
    frames: int = world.FRAMES
    chunking: Chunking = Chunking()
    split: str = "validation"

    @property
    def summary(self) -> dict[str, float]:
        isim = isim_summary(torch.tensor(self.isim_curve))
        return {**summarise(self.clips), **{f"isim_latent_{k}": v for k, v in isim.items()}}

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """The 95% interval of each averaged metric (:func:`toyworld.metrics.intervals`)."""
        return intervals(self.clips)

    @property
    def by_direction(self) -> dict[str, tuple[int, int]]:
        """Per captioned direction: (clips that moved that way, clips)."""
        return by_direction(self.clips)

    @property
    def drift_curve(self) -> list[float]:
        """Background drift of each frame (levels of 255), averaged over clips; frame 0's is 0."""
        return [round(v, 3) for v in mean_drift_per_frame(self.clips)]

    def failures(self) -> list[str]:
        """The bars (:func:`bars`) this report misses, named with the measured value."""
        summary = self.summary
        return [
            f"{BAR_NAMES[key]}: {summary[key]:.3f} is outside [{low:g}, {high:g}]"
            for key, (low, high) in bars(self.frames).items()
            if not low <= summary[key] <= high
        ]

    def to_json(self) -> dict:
        return {
            "model": self.description,
            "split": self.split,
            "frames": self.frames,
            "chunking": {
                "chunk_frames": self.chunking.chunk_frames,
                "context_frames": self.chunking.context_frames,
            },
            "sampler": {
                "steps": self.settings.steps,
                "cfg_scale": self.settings.cfg_scale,
                "eta": self.settings.eta,
                "first_frame": self.settings.first_frame,
                "colour_match": self.settings.colour_match,
            },
            "summary": self.summary,
            "intervals_95": {k: [round(v, 4) for v in pair] for k, pair in self.intervals.items()},
            "direction_accuracy_by_direction": {
                d: {"correct": k, "clips": n} for d, (k, n) in self.by_direction.items()
            },
            "isim_curve": self.isim_curve,
            "drift_per_frame": self.drift_curve,
            "clips": [{"seed": s, **c.to_dict()} for s, c in zip(self.seeds, self.clips)],
        }


# Makes one clip's video from its start image and caption: frames [f, h, w, 3] uint8 and the scaled
# latents [c, f, h/8, w/8] (the command line's generate_clip, or a host's own sampling).
ClipGenerator = Callable[[world.ToyClip, int], tuple[np.ndarray, torch.Tensor]]


def evaluate(
    toy: ToyModel,
    clips: int,
    *,
    split: str = "validation",
    first_seed: int | None = None,
    progress: bool = True,
    frames: int = world.FRAMES,
    chunking: Chunking | None = None,
) -> EvalReport:
    """Generate ``frames`` frames from each of ``clips`` clips of ``split`` (seeds from
    ``first_seed``, default the split's first) and measure every video; ``chunking`` None: as
    ``generate`` would sample them (:func:`default_chunking`)."""
    chunking = default_chunking(toy, frames) if chunking is None else chunking
    generate = functools.partial(generate_clip, toy, chunking=chunking)
    report = measure(
        generate,
        toy.description,
        toy.settings,
        clips,
        split=split,
        first_seed=first_seed,
        progress=progress,
        frames=frames,
    )
    return replace(report, chunking=chunking)


@dataclass(frozen=True)
class EvalJob:
    """One :func:`evaluate` run, named by files, for :func:`evaluate_files` (``weights`` None: the
    base UNet alone, with the sampler settings of ``settings_from``)."""

    checkpoint: Path
    weights: Path | None
    clips: int
    frames: int = world.FRAMES
    settings_from: Path | None = None
    split: str = "validation"
    first_seed: int | None = None
    # load_toy_model's steps, cfg_scale, eta and colour_match (unset: the weights' recommended)
    sampler: dict[str, Any] = field(default_factory=dict)
    chunk_frames: int | None = None  # as generate's flags (None: the weights' horizon and context decide)
    context_frames: int | None = None


def _run_job(job: EvalJob) -> EvalReport:
    """A worker's job: one thread (the workers share the cores)."""
    torch.set_num_threads(1)
    return _job_report(job)


def _job_report(job: EvalJob) -> EvalReport:
    toy = load_toy_model(job.checkpoint, job.weights, settings_from=job.settings_from, **job.sampler)
    chunking = default_chunking(toy, job.frames, job.chunk_frames, job.context_frames)
    return evaluate(
        toy, job.clips, split=job.split, first_seed=job.first_seed, frames=job.frames, chunking=chunking,
        progress=False,
    )  # fmt: skip


def _shards(job: EvalJob, parts: int) -> list[EvalJob]:
    """``job`` as up to ``parts`` jobs over consecutive runs of its clips."""
    first = world.split_seeds(job.split, job.clips, job.first_seed)[0]
    sizes = [len(part) for part in np.array_split(np.arange(job.clips), min(parts, job.clips))]
    starts = first + np.cumsum([0, *sizes[:-1]])
    return [replace(job, clips=int(n), first_seed=int(s)) for s, n in zip(starts, sizes)]


def merge_reports(parts: list[EvalReport]) -> EvalReport:
    """One report of the clips of ``parts`` (the same model, settings and length, in seed order)."""
    counts = np.asarray([len(p.clips) for p in parts], dtype=np.float64)
    curve = (np.asarray([p.isim_curve for p in parts]) * counts[:, None]).sum(0) / counts.sum()
    return replace(
        parts[0],
        clips=[c for p in parts for c in p.clips],
        seeds=[s for p in parts for s in p.seeds],
        isim_curve=[round(float(v), 5) for v in curve],
    )


def evaluate_files(jobs: list[EvalJob], workers: int = 2) -> list[EvalReport]:
    """The jobs' reports, in order, from ``workers`` processes of one thread each; each job's clips
    are shared out between the workers (the longest jobs first keeps them evenly busy). On this
    project's 2 cores two one-thread samplers make about 1.45x the clips per second of one
    two-thread sampler (toy videos are too small to keep two threads busy). ``workers`` 1: in this
    process, with its threads, one job after another."""
    if workers == 1:
        return [_job_report(job) for job in jobs]
    shards = [_shards(job, workers) for job in jobs]
    tasks = [shard for parts in shards for shard in parts]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        done = iter(pool.map(_run_job, tasks))
        return [merge_reports([next(done) for _ in parts]) for parts in shards]


def measure(
    generate: ClipGenerator,
    description: str,
    settings: SamplerSettings,
    clips: int,
    *,
    split: str = "validation",
    first_seed: int | None = None,
    progress: bool = True,
    frames: int = world.FRAMES,
) -> EvalReport:
    """Measure the videos ``generate(clip, seed)`` makes from ``clips`` clips of ``split`` (seeds
    from ``first_seed``, default the split's first) of ``frames`` frames."""
    seeds = world.split_seeds(split, clips, first_seed)
    results, curves = [], []
    for seed in tqdm(seeds, desc=f"evaluating {description}", unit="clip", disable=not progress):
        clip = world.make_clip(seed, frames)
        video, latents = generate(clip, seed)
        results.append(clip_metrics(video, clip.frames[0], clip.rgb, clip.direction))
        features = latent_features(latents.float())
        curves.append(isim_curve(features, features[0]))
    curve = torch.stack(curves).mean(0)
    return EvalReport(
        description, settings, results, seeds, [round(float(v), 5) for v in curve], frames, split=split
    )


@torch.no_grad()
def vae_round_trip(vae: torch.nn.Module, clip: world.ToyClip, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """The truth as a model at its best could give it (a :data:`ClipGenerator`; ``seed`` unused):
    ``clip``'s own frames encoded by ``vae`` and decoded again, and their scaled latents: the
    reference every generated video's figures are read against (a moving object lowers ISIM)."""
    pixels = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 255
    latents = encode_image_latent(vae, pixels).permute(1, 0, 2, 3)  # [c, f, h/8, w/8]
    return to_uint8_frames(decode_latents(vae, latents[None])[0]), latents


def truth_report(checkpoint: str | os.PathLike, clips: int, *, split: str = "validation") -> EvalReport:
    """:func:`vae_round_trip`'s figures on ``clips`` clips of ``split``, through ``checkpoint``'s VAE."""
    vae = load_sd15(checkpoint, text_encoder=False).vae
    generate = functools.partial(vae_round_trip, vae)
    return measure(generate, "truth through the VAE", SamplerSettings(), clips, split=split, progress=False)


def markdown_table(reports: list[EvalReport]) -> str:
    """One row per metric, one column per report, with the bars (of the first report's length)."""
    limits = bars(reports[0].frames)

    def bar(key: str) -> str:
        low, high = limits[key]
        if high == float("inf") or (key != "speed" and high == 1.0):
            return f">= {low:g}"
        return f"<= {high:g}" if low == 0 else f"{low:g}-{high:g}"

    formats = {"frame0_psnr": "{:.1f}", "persistence": "{:.2f}", "direction_accuracy": "{:.2f}",
               "speed": "{:.2f}", "background_drift": "{:.1f}"}  # fmt: skip
    rows = [(key, BAR_NAMES[key], bar(key), formats[key]) for key in BAR_NAMES] + [
        ("isim_latent_first", "ISIM (latent) first", "", "{:.3f}"),
        ("isim_latent_avg", "ISIM (latent) average", "", "{:.3f}"),
        ("isim_latent_decay", "ISIM (latent) decay per frame", "", "{:.4f}"),
    ]
    summaries = [r.summary for r in reports]
    spans = [r.intervals for r in reports]

    def cell(i: int, key: str, fmt: str) -> str:
        value = fmt.format(summaries[i][key])
        return (
            value
            if key not in spans[i]
            else f"{value} ({fmt.format(spans[i][key][0])}-{fmt.format(spans[i][key][1])})"
        )

    lines = [
        f"{len(reports[0].clips)} {reports[0].split} clips (seeds {reports[0].seeds[0]}..{reports[0].seeds[-1]}); "
        "in brackets the 95% interval (direction accuracy: Wilson score; persistence: percentile bootstrap; "
        "others: mean +- 1.96 standard errors)",
        "",
        "| metric | bar | " + " | ".join(r.description for r in reports) + " |",
        "|---|---|" + "---|" * len(reports),
    ]
    for key, name, bar, fmt in rows:
        lines.append(
            f"| {name} | {bar} | " + " | ".join(cell(i, key, fmt) for i in range(len(reports))) + " |"
        )
        if key == "direction_accuracy":
            for d in world.DIRECTIONS:
                counts = [f"{k}/{n}" for k, n in (r.by_direction[d] for r in reports)]
                lines.append(f"| - captioned {d} | | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def write_plots(reports: list[EvalReport], folder: str | os.PathLike) -> list[Path]:
    """``isim.png`` and ``drift.png`` in ``folder``: each report's ISIM and drift per frame."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{r.description}, {r.chunking.describe()}" for r in reports]
    plots = {
        "isim.png": plot_curves({n: r.isim_curve for n, r in zip(names, reports)}),
        "drift.png": plot_curves(
            {n: r.drift_curve for n, r in zip(names, reports)}, "background drift (levels of 255)", y_max=None
        ),
    }
    return [write_image(folder / name, image) for name, image in plots.items()]


def write_report(reports: list[EvalReport], path: str | os.PathLike) -> Path:
    """The reports' per-clip results as JSON at ``path``, written atomically."""
    return write_text(path, json.dumps([r.to_json() for r in reports], indent=2))
