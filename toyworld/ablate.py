"""``python -m lookback_cli toyworld ablate``: the paper's ablations, measured in the toy world.

Every variant is trained by the product's trainer from the same base model, data, steps and
training seeds (the toy build's look-back stage, :func:`toyworld.build.train_lookback`, plus the
variant's flags), once per seed, and evaluated on the same clips of the *test* split with the same
sampler, with the colour match to the first frame on and off. Written to ``out``:

- ``ablation.md`` and ``ablation.json``: per variant the mean over its seeds and the spread (the
  lowest and highest seed), its trainable parameters, step time and training time; each variant's
  difference from the paper's look-back marked where it is larger than both spreads (the seeds'
  ranges do not overlap); last, the truth through the VAE (:func:`toyworld.evaluate.vae_round_trip`:
  the test clips themselves, what a perfect model would score; a moving object lowers ISIM, so
  each variant's ISIM curve is also given as its mean distance from the truth's);
- ``isim.png`` and ``drift.png``: ISIM and background drift per frame, one curve per variant and
  the truth's;
- ``contact_sheet.png``: the first test clip's start image, every variant's frames in rows (its
  first seed), the truth last.

With ``workers`` above 1 that many trainings run at once, one thread each (a variant's seeds
side by side), each trainer's output in its folder's ``train.log``. Each training resumes where it stopped, and each evaluation (``variants/<name>/seed-<s>/row.json``)
is kept while its files (by content), the recipe and the evaluation's settings stand, so a rerun
after an interruption only does what is left. A training's time comes from the trainer's step log,
so it counts every run of an interrupted training, not the pause.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lookback_core.atomic import write_image, write_text
from lookback_core.temporal_unet import module_parameter_count
from lookback_core.weights import read_temporal_header

from . import world
from .build import (
    StageTimer,
    ToyRecipe,
    check_reusable,
    git_commit,
    lookback_phases,
    machine,
    prepare,
    step_durations,
    train_lookback,
    training_seconds,
)
from .evaluate import EvalJob, evaluate_files, generate_clip, load_toy_model, truth_report
from .pictures import contact_sheet, plot_curves

# An AnimateDiff-style motion module in place of the look-back (lookback_core.temporal_attention)
ATTENTION_ONLY = ("--no_lookback_conv", "--no_adapter", "--no_channel_mix", "--temporal_attention")
# name -> the trainer's flags for it: those that choose the modules, and the others (None: the
# base model alone, no temporal modules)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None] = {
    "base only": None,
    "adapter only (normal 3D conv)": (("--no_lookback_conv",), ()),
    "look-back conv only": (("--no_adapter",), ()),
    "look-back + adapter (paper)": ((), ()),
    "look-back + causal adapter": (("--causal_adapter",), ()),
    "d=2": (("--lookback_depth", "2"), ()),
    "d=5": (("--lookback_depth", "5"), ()),
    "add noise (ddpm objective)": ((), ("--objective", "ddpm")),
    # beyond the paper: the shipped recipe's modules are the paper's with the anchor
    "+ first-frame anchor (shipped)": (("--first_frame_anchor",), ()),
    "+ noisier timesteps (later x4)": ((), (
        "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "4", "--timestep_bias_portion", "0.3",
    )),
    # the alternative the paper argues against, full and masked to the past
    "temporal attention (AnimateDiff-style)": ((*ATTENTION_ONLY, "full"), ()),
    "causal temporal attention": ((*ATTENTION_ONLY, "causal"), ()),
}  # fmt: skip
# What the study runs by default: the paper's claim (look-back against temporal attention) and
# the rows that explain it; the other variants are there to be asked for by name.
STUDY = [
    "base only",
    "adapter only (normal 3D conv)",
    "look-back + adapter (paper)",
    "+ first-frame anchor (shipped)",
    "temporal attention (AnimateDiff-style)",
    "causal temporal attention",
]
REFERENCE = "look-back + adapter (paper)"  # what every other row's difference is measured against
TRUTH = "truth through the VAE"  # the reference row: the test clips themselves, encoded and decoded
COLOUR_MATCHES = ("first_frame", "off")  # a sampler setting: every variant is measured with both
COLUMNS = [  # summary key, header, format
    ("frame0_psnr", "frame-0 PSNR (dB)", "{:.1f}"),
    ("persistence", "persistence", "{:.2f}"),
    ("direction_accuracy", "direction", "{:.2f}"),
    ("speed", "speed (px/frame)", "{:.2f}"),
    ("background_drift", "drift", "{:.1f}"),
    ("isim_latent_first", "ISIM first", "{:.3f}"),
    ("isim_latent_avg", "ISIM avg", "{:.3f}"),
    ("isim_latent_decay", "ISIM decay", "{:.4f}"),
    ("isim_truth_gap", "ISIM gap to truth", "{:.3f}"),
    ("frame_jump", "frame 0->1 jump", "{:.2f}"),
]


def _folder_name(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant).strip("_")


def ablate(
    out: str | Path,
    recipe: ToyRecipe | None = None,
    variants: list[str] | None = None,
    *,
    seeds: tuple[int, ...] = (0, 1),
    test_clips: int = 64,
    workers: int = 2,
) -> list[dict]:
    """Train ``variants`` (default: :data:`STUDY`) once per training seed in ``seeds`` with
    ``recipe`` (default: the toy build's, with the paper's modules: the first-frame anchor is a
    variant of its own), evaluate each on ``test_clips`` clips of the test split with the colour
    match on and off; returns the table's rows. ``workers``: trainings and evaluation processes run
    side by side, one thread each (1: one at a time, in this process's threads)."""
    recipe = replace(recipe or ToyRecipe(), first_frame_anchor=False)
    variants = list(STUDY) if variants is None else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct whole numbers 0 or more, got {list(seeds)}")
    if test_clips < 1:
        raise ValueError(f"--test-clips must be 1 or more, got {test_clips}")
    out = Path(out).resolve()
    for name in variants:  # before any work: no stage of another recipe is reused
        for seed in seeds:
            check_reusable(out, recipe, _run_folder(out, name, seed))
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    base, _ = prepare(out, recipe, StageTimer())
    # the base alone trains nothing: one run, whatever the seeds
    jobs = [(name, seed) for name in variants for seed in (seeds if VARIANTS[name] else seeds[:1])]
    trained = _trainings(out, base, jobs, recipe, workers)
    runs = {name: [run for run in trained if run["name"] == name] for name in variants}
    reference = truth_report(base, test_clips, split="test")
    truth = {
        "summary": {**reference.summary, "isim_truth_gap": 0.0},
        "curves": {"isim": reference.isim_curve, "drift": reference.drift_curve},
    }
    rows = [
        _row(name, [_evaluated(run, recipe, test_clips, workers) for run in runs[name]], reference.isim_curve)
        for name in variants
    ]
    facts = {
        "commit": commit, "machine": machine(), "recipe": asdict(recipe), "seeds": list(seeds),
        "split": "test", "test_clips": test_clips, "workers": workers,
    }  # fmt: skip
    write_text(out / "ablation.json", json.dumps({**facts, "rows": rows, "truth": truth}, indent=2))
    table = markdown_table(rows, truth)
    write_text(out / "ablation.md", table + "\n")
    clip = world.make_clip(world.split_seeds("test", 1)[0])
    sheet = {}
    for name in variants:
        run = runs[name][0]
        toy = load_toy_model(run["checkpoint"], run["weights"], steps=recipe.sampler_steps,
                             cfg_scale=recipe.sampler_cfg_scale, colour_match=COLOUR_MATCHES[0])  # fmt: skip
        sheet[name] = generate_clip(toy, clip, clip.seed)[0]
    sheet["truth"] = clip.frames
    write_image(out / "contact_sheet.png", contact_sheet(sheet))
    on = COLOUR_MATCHES[0]
    for kind, title, y_max in (("isim", "ISIM (latent) to frame 0", 1.0),
                               ("drift", "background drift (levels of 255)", None)):  # fmt: skip
        curves = {r["variant"]: r["curves"][on][kind] for r in rows} | {TRUTH: truth["curves"][kind]}
        write_image(out / f"{kind}.png", plot_curves(curves, title, y_max=y_max))
    print(table)
    return rows


def _run_folder(out: Path, name: str, seed: int) -> Path:
    return out / "variants" / _folder_name(name) / f"seed-{seed}"


def _trainings(
    out: Path, base: Path, jobs: list[tuple[str, int]], recipe: ToyRecipe, workers: int
) -> list[dict]:
    """Each (variant, seed) of ``jobs`` trained, in order: one after another with torch's threads
    (``workers`` 1), or ``workers`` at once with one thread each, each trainer's output in its
    folder's ``train.log`` (a variant's seeds side by side: every step time is measured alike)."""
    if workers == 1:
        return [_trained(out, base, name, seed, recipe) for name, seed in jobs]
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_trained, out, base, name, seed, recipe, 1) for name, seed in jobs]
        return [future.result() for future in futures]


def _trained(
    out: Path, base: Path, name: str, seed: int, recipe: ToyRecipe, threads: int | None = None
) -> dict:
    """One variant trained with one training seed (resumed where it stopped; ``threads``: see
    :func:`toyworld.build.train_lookback`): its files and costs."""
    flags = VARIANTS[name]
    folder = _run_folder(out, name, seed)
    if flags is None:
        return {"name": name, "seed": seed, "folder": folder, "checkpoint": base, "weights": None,
                "train_s": 0, "step_s": 0.0, "parameters": 0}  # fmt: skip
    final = train_lookback(out, base, folder, recipe, *flags, seed=seed, threads=threads)
    phases = lookback_phases(folder, recipe).values()
    durations = np.concatenate([step_durations(p / "logs" / "metrics.jsonl") for p in phases])
    weights = final / "lookback_weights.safetensors"
    return {
        "name": name, "seed": seed, "folder": folder, "checkpoint": final / "base_checkpoint.safetensors",
        "weights": weights,
        "train_s": round(sum(training_seconds(p / "logs" / "metrics.jsonl") for p in phases)),
        "step_s": float(np.median(durations)) if len(durations) else float("nan"),
        "parameters": _parameters(weights),
    }  # fmt: skip


def _parameters(weights: Path) -> int:
    """The temporal modules' trained parameters, from the weights file's configuration."""
    return module_parameter_count(read_temporal_header(weights).config)


def _digest(path: Path) -> str:
    """A safetensors file's tensors and metadata, by content (its bytes vary: the header's order
    is not fixed)."""
    digest = hashlib.sha256()
    with safe_open(path, framework="pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):  # noqa: SIM118 (safe_open is not iterable)
            digest.update(name.encode())
            digest.update(f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _evaluated(run: dict, recipe: ToyRecipe, test_clips: int, workers: int) -> dict:
    """One trained run's figures with each colour match: evaluated now, or as its ``row.json`` holds
    them while its files, the recipe and the evaluation are the ones they were measured with (it
    keeps the wall time of the run that trained it)."""
    files = [run["checkpoint"], run["weights"]]
    key = {
        "files": [_digest(p) for p in files if p is not None], "recipe": asdict(recipe),
        "split": "test", "clips": test_clips, "colour_matches": list(COLOUR_MATCHES),
    }  # fmt: skip
    saved = run["folder"] / "row.json"
    if saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("key") == key:  # the costs are the run's own, counted again
            return row | {k: run[k] for k in ("train_s", "step_s", "parameters")}
    sampler = {"steps": recipe.sampler_steps, "cfg_scale": recipe.sampler_cfg_scale}
    jobs = [EvalJob(run["checkpoint"], run["weights"], test_clips, split="test",
                    sampler={**sampler, "colour_match": match}) for match in COLOUR_MATCHES]  # fmt: skip
    reports = evaluate_files(jobs, workers=workers)
    row = {
        "variant": run["name"], "seed": run["seed"], "key": key,
        "flags": [f for group in VARIANTS[run["name"]] or () for f in group],
        **{k: run[k] for k in ("train_s", "step_s", "parameters")},
        "summary": {m: r.summary for m, r in zip(COLOUR_MATCHES, reports, strict=True)},
        "curves": {m: {"isim": r.isim_curve, "drift": r.drift_curve} for m, r in zip(COLOUR_MATCHES, reports, strict=True)},
    }  # fmt: skip
    write_text(saved, json.dumps(row, indent=2))
    return row


def _row(name: str, runs: list[dict], truth_isim: list[float]) -> dict:
    """A variant's row: each figure's mean over its seeds and its spread (lowest, highest), with
    each run's ISIM gap to the truth's curve ``truth_isim``."""
    figures = {}
    for match in COLOUR_MATCHES:
        summaries = [
            {**r["summary"][match], "isim_truth_gap": _isim_gap(r["curves"][match]["isim"], truth_isim)}
            for r in runs
        ]
        figures[match] = {}
        for key in summaries[0]:
            values = [summary[key] for summary in summaries]
            figures[match][key] = {"mean": float(np.mean(values)), "low": min(values), "high": max(values)}
    curves = {
        match: {kind: np.mean([r["curves"][match][kind] for r in runs], axis=0).round(4).tolist() for kind in ("isim", "drift")}
        for match in COLOUR_MATCHES
    }  # fmt: skip
    return {
        "variant": name, "flags": runs[0]["flags"], "seeds": [r["seed"] for r in runs],
        "parameters": runs[0]["parameters"],
        "step_s": float(np.mean([r["step_s"] for r in runs])), "train_s": float(np.mean([r["train_s"] for r in runs])),
        "figures": figures, "curves": curves, "runs": runs,
    }  # fmt: skip


def _isim_gap(curve: list[float], truth: list[float]) -> float:
    """How far an ISIM curve is from the truth's: the mean over frames of their absolute difference
    (ISIM alone rewards a still video: the truth's falls as its object moves away)."""
    return float(np.mean(np.abs(np.asarray(curve) - np.asarray(truth))))


def _beyond_spread(row: dict, reference: dict | None, match: str, key: str) -> bool:
    """Whether ``row``'s figure differs from ``reference``'s by more than both spreads (their seeds'
    ranges do not overlap)."""
    if reference is None or reference is row:
        return False
    a, b = row["figures"][match][key], reference["figures"][match][key]
    return a["low"] > b["high"] or a["high"] < b["low"]


def markdown_table(rows: list[dict], truth: dict | None = None) -> str:
    """One table per colour match: mean (lowest-highest seed) per figure; a figure in bold differs
    from :data:`REFERENCE`'s by more than both spreads; then parameters, step and training time;
    ``truth`` (its ``summary``), the test clips through the VAE, last in each."""
    reference = next((r for r in rows if r["variant"] == REFERENCE), None)
    seeds = max((len(r["seeds"]) for r in rows), default=0)
    untrained = [r["variant"] for r in rows if VARIANTS[r["variant"]] is None]
    one_run = f" ({', '.join(untrained)}: one run, it trains nothing)" if untrained and seeds > 1 else ""
    parts = []
    for match in COLOUR_MATCHES:
        lines = [
            f"Colour match {match}; mean over {seeds} training seed(s){one_run}, in brackets the lowest and "
            f"highest seed; **bold**: beyond both spreads from '{REFERENCE}'.",
            "",
            "| variant | "
            + " | ".join(header for _, header, _ in COLUMNS)
            + " | parameters | step | training |",
            "|---|" + "---|" * (len(COLUMNS) + 3),
        ]
        for row in rows:
            cells = []
            for key, _, fmt in COLUMNS:
                f = row["figures"][match][key]
                text = f"{fmt.format(f['mean'])} ({fmt.format(f['low'])}-{fmt.format(f['high'])})"
                cells.append(f"**{text}**" if _beyond_spread(row, reference, match, key) else text)
            costs = [f"{row['parameters']:,}", f"{row['step_s']:.2f} s", f"{row['train_s'] / 60:.1f} min"]
            lines.append(f"| {row['variant']} | " + " | ".join(cells + costs) + " |")
        if truth is not None:
            cells = [fmt.format(truth["summary"][key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {TRUTH} | " + " | ".join(cells + ["-"] * 3) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
