"""``python -m lookback_core toyworld eval``: generate from held-out toy-world start images and measure.

Each held-out clip (seeds from ``toyworld.HELD_OUT_SEED`` on, never used in training) gives its
first frame and its caption; the model generates a video from them with the code every front
end uses (:func:`lookback_core.pipeline.generate_latents`, the sampler settings ``generate``
would pick), and :mod:`lookback_core.toymetrics` measures it. The ISIM curve is the paper's
measure in VAE-latent space (:mod:`lookback_core.metrics`), averaged over clips.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import toyworld
from .image_prep import to_uint8_frames
from .latents import latent_scale
from .metrics import isim_curve, isim_summary, latent_features
from .pipeline import decode_latents, generate_latents
from .sampler import SamplerSettings, resolve_settings
from .sd15 import SD15Components, encode_prompt, load_sd15
from .temporal_unet import LookBackUNet
from .toy import TOY_CHECKPOINT, TOY_WEIGHTS
from .toymetrics import ClipMetrics, clip_metrics, summarise
from .weights import load_lookback_unet, read_temporal_header

# The bars the shipped toy model must reach (held-out clips, generate's default settings).
BARS: dict[str, tuple[str, float, float]] = {
    "frame0_psnr": ("frame-0 PSNR vs start image (dB)", 28.0, float("inf")),
    "persistence": ("persistence", 0.9, 1.0),
    "direction_accuracy": ("direction accuracy", 0.8, 1.0),
    "speed": ("mean speed along direction (px/frame)", 1.5, 2.5),
    "background_drift": ("background drift (levels of 255)", 0.0, 8.0),
}


@dataclass
class ToyModel:
    """A loaded toy model: the SD1.5 parts, the (look-back or base) UNet and its sampler settings."""

    components: SD15Components
    model: LookBackUNet
    settings: SamplerSettings
    description: str
    recommended: dict[str, Any] = field(default_factory=dict)


def load_toy_model(
    checkpoint: str | os.PathLike = TOY_CHECKPOINT,
    weights: str | os.PathLike | None = TOY_WEIGHTS,
    *,
    steps: int | None = None,
    cfg_scale: float | None = None,
    eta: float | None = None,
    settings_from: str | os.PathLike | None = None,
) -> ToyModel:
    """Load a checkpoint with temporal ``weights`` (``None``: the base UNet alone), on the CPU in fp32.

    Sampler settings resolve as in ``generate``: the arguments given, else the recommended
    settings of ``weights`` (or of ``settings_from``, so a base-only run can use the same
    sampler as the look-back run it is compared with), else the defaults.
    """
    components = load_sd15(checkpoint)
    source = weights if weights is not None else settings_from
    recommended = read_temporal_header(source).recommended_sampler if source is not None else {}
    settings, _ = resolve_settings({"steps": steps, "cfg_scale": cfg_scale, "eta": eta}, recommended, seed=0)
    if weights is not None:
        model = load_lookback_unet(weights, components.unet, latent_scale=latent_scale(components.vae))
        description = f"look-back ({Path(weights).name})"
    else:
        model = LookBackUNet(components.unet, None)
        description = "base without look-back"
    return ToyModel(components, model, settings, description, recommended)


def generate_clip(toy: ToyModel, clip: toyworld.ToyClip, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Frames ``[f, h, w, 3]`` uint8 and latents ``[c, f, h/8, w/8]`` generated from ``clip``'s first frame."""
    image = torch.from_numpy(clip.frames[0]).permute(2, 0, 1)[None].float() / 255
    texts = encode_prompt(toy.components.tokenizer, toy.components.text_encoder, [clip.caption, ""], "cpu")
    settings = replace(toy.settings, seed=seed)
    latents = generate_latents(
        toy.model,
        toy.components.vae,
        image,
        texts[:1],
        texts[1:],
        toyworld.FRAMES,
        settings,
        toy.components.scheduler_config,
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

    @property
    def summary(self) -> dict[str, float]:
        isim = isim_summary(torch.tensor(self.isim_curve))
        return {**summarise(self.clips), **{f"isim_latent_{k}": v for k, v in isim.items()}}

    def failures(self) -> list[str]:
        """The bars (:data:`BARS`) this report misses, named with the measured value."""
        summary = self.summary
        return [
            f"{name}: {summary[key]:.3f} is outside [{low:g}, {high:g}]"
            for key, (name, low, high) in BARS.items()
            if not low <= summary[key] <= high
        ]

    def to_json(self) -> dict:
        return {
            "model": self.description,
            "sampler": {
                "steps": self.settings.steps,
                "cfg_scale": self.settings.cfg_scale,
                "eta": self.settings.eta,
                "first_frame": self.settings.first_frame,
            },
            "summary": self.summary,
            "isim_curve": self.isim_curve,
            "clips": [{"seed": s, **c.to_dict()} for s, c in zip(self.seeds, self.clips)],
        }


# Makes one clip's video from its start image and caption: frames [f, h, w, 3] uint8 and the scaled
# latents [c, f, h/8, w/8] (the command line's generate_clip, or a host's own sampling).
ClipGenerator = Callable[[toyworld.ToyClip, int], tuple[np.ndarray, torch.Tensor]]


def evaluate(
    toy: ToyModel, clips: int, *, first_seed: int = toyworld.HELD_OUT_SEED, progress: bool = True
) -> EvalReport:
    """Generate from ``clips`` held-out clips (seeds ``first_seed...``) and measure every video."""
    generate = functools.partial(generate_clip, toy)
    return measure(generate, toy.description, toy.settings, clips, first_seed=first_seed, progress=progress)


def measure(
    generate: ClipGenerator,
    description: str,
    settings: SamplerSettings,
    clips: int,
    *,
    first_seed: int = toyworld.HELD_OUT_SEED,
    progress: bool = True,
) -> EvalReport:
    """Measure the videos ``generate(clip, seed)`` makes from ``clips`` held-out clips (seeds ``first_seed...``)."""
    if first_seed < toyworld.HELD_OUT_SEED:
        raise ValueError(
            f"held-out seeds start at {toyworld.HELD_OUT_SEED}; {first_seed} may have been trained on"
        )
    results, curves, seeds = [], [], list(range(first_seed, first_seed + clips))
    for seed in tqdm(seeds, desc=f"evaluating {description}", unit="clip", disable=not progress):
        clip = toyworld.make_clip(seed)
        frames, latents = generate(clip, seed)
        results.append(clip_metrics(frames, clip.frames[0], clip.rgb, clip.direction))
        features = latent_features(latents.float())
        curves.append(isim_curve(features, features[0]))
    curve = torch.stack(curves).mean(0)
    return EvalReport(description, settings, results, seeds, [round(float(v), 5) for v in curve])


def markdown_table(reports: list[EvalReport]) -> str:
    """One row per metric, one column per report, with the bars."""
    rows = [
        ("frame0_psnr", "frame-0 PSNR vs start image (dB)", ">= 28", "{:.1f}"),
        ("persistence", "persistence", ">= 0.9", "{:.2f}"),
        ("direction_accuracy", "direction accuracy", ">= 0.8", "{:.2f}"),
        ("speed", "mean speed along direction (px/frame)", "1.5-2.5", "{:.2f}"),
        ("background_drift", "background drift (levels of 255)", "<= 8", "{:.1f}"),
        ("isim_latent_first", "ISIM (latent) first", "", "{:.3f}"),
        ("isim_latent_avg", "ISIM (latent) average", "", "{:.3f}"),
        ("isim_latent_decay", "ISIM (latent) decay per frame", "", "{:.4f}"),
    ]
    summaries = [r.summary for r in reports]
    lines = [
        "| metric | bar | " + " | ".join(r.description for r in reports) + " |",
        "|---|---|" + "---|" * len(reports),
    ]
    for key, name, bar, fmt in rows:
        lines.append(f"| {name} | {bar} | " + " | ".join(fmt.format(s[key]) for s in summaries) + " |")
    return "\n".join(lines)


def write_report(reports: list[EvalReport], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in reports], indent=2))
    return path
