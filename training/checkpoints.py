"""Resumable checkpoints that are never half-written, and read without running pickled code.

A checkpoint ``checkpoint-<step>`` holds accelerate's state of the trained weights (safetensors),
optimizer and lr scheduler (read back by accelerate with ``torch.load(weights_only=True)``), the
trainer's own state as safetensors + JSON (the EMA weights ``ema.safetensors``, each process's
training RNG ``rng_<rank>.safetensors``, ``trainer_state.json``) and the deployable temporal
weights file. Nothing is registered with accelerate as a custom (pickled) object. A checkpoint
is written into ``checkpoint-<step>.tmp``, marked complete, and only then renamed into place;
older checkpoints are pruned after that. Resume picks the newest complete one that loads.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lookback_core.atomic import save_safetensors

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
WEIGHTS_NAME = "lookback_weights.safetensors"
BACKBONE_NAME = "base_checkpoint.safetensors"  # with --train_backbone: the base with the trained UNet
EMA_NAME = "ema.safetensors"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _NAME.fullmatch(p.name)) and (p / COMPLETE_MARKER).is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: Path, request: str) -> Path | None:
    """``request`` is ``latest`` (None when there is none yet) or a checkpoint folder."""
    if request == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(request)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"--resume_from_checkpoint {request}: not a complete checkpoint folder")
    return path


def temporary_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}.tmp"


def begin(tmp: Path) -> None:
    """Create ``tmp`` empty, removing what a killed run may have left there."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def commit(tmp: Path, state: dict[str, Any], total_limit: int | None) -> Path:
    """Mark ``tmp`` complete, rename it into place, then prune the oldest beyond ``total_limit``."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    (tmp / COMPLETE_MARKER).write_text("")
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None:
        for old in complete_checkpoints(final.parent)[:-total_limit]:
            shutil.rmtree(old)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete leftovers of a run killed while saving; returns what was removed."""
    if not output_dir.is_dir():
        return []
    leftovers = [
        p
        for p in output_dir.iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and not (p / COMPLETE_MARKER).is_file()
    ]
    for p in leftovers:
        shutil.rmtree(p)
    return leftovers


def save_ema(folder: Path, ema: Any) -> None:
    """A diffusers ``EMAModel``'s state: shadow weights as tensors, the rest as JSON metadata."""
    state = ema.state_dict()
    tensors = {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(state.pop("shadow_params"))}
    save_safetensors(tensors, folder / EMA_NAME, {"state": json.dumps(state)})


def load_ema(folder: Path, ema: Any) -> None:
    from safetensors import safe_open

    path = folder / EMA_NAME
    with safe_open(path, framework="pt") as f:
        state = json.loads((f.metadata() or {})["state"])
    tensors = load_file(path)
    state["shadow_params"] = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    ema.load_state_dict(state)


def rng_path(folder: Path, rank: int) -> Path:
    return folder / f"rng_{rank}.safetensors"


def save_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    save_safetensors({"state": generator.get_state()}, rng_path(folder, rank))


def load_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    generator.set_state(load_file(rng_path(folder, rank))["state"])


def run_files(output_dir: Path) -> list[Path]:
    """An earlier run's checkpoints and deployable files in ``output_dir`` (what ``remove_run`` deletes)."""
    if not output_dir.is_dir():
        return []
    files = [p for p in output_dir.iterdir() if _NAME.fullmatch(p.name.removesuffix(".tmp"))]
    return files + [output_dir / n for n in (WEIGHTS_NAME, BACKBONE_NAME) if (output_dir / n).exists()]


def inputs_inside_run(output_dir: Path, inputs: Iterable[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """The ``inputs`` (flag, path) that are, or lie inside, one of ``output_dir``'s run files."""
    doomed = [p.resolve() for p in run_files(output_dir)]
    return [
        (flag, value)
        for flag, value in inputs
        if value is not None and any(Path(value).resolve().is_relative_to(d) for d in doomed)
    ]


def remove_run(output_dir: Path) -> list[Path]:
    """Delete an earlier run's checkpoints and deployable files (``--overwrite_output_dir``)."""
    doomed = run_files(output_dir)
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return doomed
