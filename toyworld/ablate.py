"""``python -m lookback_cli toyworld ablate``: the paper's ablations, measured in the toy world.

Every variant is trained by the product's trainer from the same base model, data, steps and seed
(the toy build's look-back stage, :func:`toyworld.build.train_lookback`, plus the
variant's flags), and evaluated on the same held-out clips with the same sampler. Written to
``out``: ``ablation.md`` and ``ablation.json`` (the table), ``isim.png`` (the ISIM curve of every
variant, as the paper plots it) and ``contact_sheet.png`` (one held-out start image, every
variant's frames in rows, the truth last). Each variant's training resumes where it stopped, and
its evaluation (``variants/<name>/row.json``) is kept while its files (by content) and the recipe
stand, so a rerun after an interruption only does what is left. A variant's training time comes
from the trainer's step log, so it counts every run of an interrupted training, not the pause.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import safe_open

from lookback_core.atomic import write_image, write_text

from . import world
from .build import (
    StageTimer,
    ToyRecipe,
    check_reusable,
    git_commit,
    lookback_phases,
    machine,
    prepare,
    train_lookback,
    training_seconds,
)
from .evaluate import ToyModel, evaluate, generate_clip, load_toy_model
from .pictures import contact_sheet, plot_curves

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
    # beyond the paper
    "+ first-frame anchor": (("--first_frame_anchor",), ()),
    "+ noisier timesteps (later x4)": ((), (
        "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "4", "--timestep_bias_portion", "0.3",
    )),
}  # fmt: skip
COLUMNS = [  # summary key, header, format
    ("frame0_psnr", "frame-0 PSNR (dB)", "{:.1f}"),
    ("persistence", "persistence", "{:.2f}"),
    ("direction_accuracy", "direction", "{:.2f}"),
    ("speed", "speed (px/frame)", "{:.2f}"),
    ("background_drift", "drift", "{:.1f}"),
    ("isim_latent_first", "ISIM first", "{:.3f}"),
    ("isim_latent_avg", "ISIM avg", "{:.3f}"),
    ("isim_latent_decay", "ISIM decay", "{:.4f}"),
    ("frame_jump", "frame 0->1 jump", "{:.2f}"),
]


def _folder_name(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant).strip("_")


def ablate(out: str | Path, recipe: ToyRecipe | None = None, variants: list[str] | None = None) -> list[dict]:
    """Train and evaluate ``variants`` (default: all of :data:`VARIANTS`) with ``recipe`` (default: the
    toy build's, with the paper's modules: the first-frame anchor is a variant of its own);
    returns the table's rows."""
    recipe = replace(recipe or ToyRecipe(), first_frame_anchor=False)
    variants = list(VARIANTS) if variants is None else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    out = Path(out).resolve()
    for name in variants:  # before any work: no stage of another recipe is reused
        check_reusable(out, recipe, out / "variants" / _folder_name(name))
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    base, _ = prepare(out, recipe, StageTimer())
    rows, sheet = [], {}
    clip = world.make_clip(world.HELD_OUT_SEED)
    for name in variants:
        flags = VARIANTS[name]
        folder = out / "variants" / _folder_name(name)
        if flags is None:
            checkpoint, weights, train_s = base, None, 0
        else:
            final = train_lookback(out, base, folder, recipe, *flags)
            checkpoint, weights = (
                final / "base_checkpoint.safetensors",
                final / "lookback_weights.safetensors",
            )
            train_s = round(sum(
                training_seconds(phase / "logs" / "metrics.jsonl") for phase in lookback_phases(folder, recipe).values()
            ))  # fmt: skip
        toy = load_toy_model(
            checkpoint, weights, steps=recipe.sampler_steps, cfg_scale=recipe.sampler_cfg_scale
        )
        rows.append(_evaluated(toy, name, folder / "row.json", [checkpoint, weights], recipe, train_s))
        sheet[name] = generate_clip(toy, clip, world.HELD_OUT_SEED)[0]
    sheet["truth"] = clip.frames
    facts = {"commit": commit, "machine": machine(), "recipe": asdict(recipe), "caption": clip.caption}
    write_text(out / "ablation.json", json.dumps({**facts, "rows": rows}, indent=2))
    table = markdown_table(rows)
    write_text(out / "ablation.md", table + "\n")
    write_image(out / "contact_sheet.png", contact_sheet(sheet))
    write_image(out / "isim.png", plot_curves({r["variant"]: r["isim_curve"] for r in rows}))
    print(table)
    return rows


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


def _evaluated(
    toy: ToyModel, name: str, saved: Path, files: list[Path | None], recipe: ToyRecipe, train_s: int
) -> dict:
    """The variant's row: evaluated now, or as ``saved`` holds it while its files and the recipe
    are the ones it was evaluated with (it keeps the wall time of the run that trained it)."""
    key = {"files": [_digest(p) for p in files if p is not None], "recipe": asdict(recipe)}
    if saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("key") == key:
            return row
    report = evaluate(toy, recipe.eval_clips)
    row = {"variant": name, "flags": [f for group in VARIANTS[name] or () for f in group], "train_s": train_s, "key": key,
           "summary": report.summary, "isim_curve": report.isim_curve}  # fmt: skip
    write_text(saved, json.dumps(row, indent=2))
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | " + " | ".join(header for _, header, _ in COLUMNS) + " | training |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [fmt.format(row["summary"][key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {row['train_s'] / 60:.1f} min |")
    return "\n".join(lines)
