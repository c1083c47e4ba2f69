"""Resumable checkpoints that are never half-written.

A checkpoint ``checkpoint-<step>`` holds accelerate's full state (trained weights, optimizer,
lr scheduler, EMA, RNG states), the deployable temporal weights file and ``trainer_state.json``.
It is written into ``checkpoint-<step>.tmp``, marked complete, and only then renamed into place;
older checkpoints are pruned after that. Resume picks the newest complete one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
WEIGHTS_NAME = "lookback_weights.safetensors"
BACKBONE_NAME = "base_checkpoint.safetensors"  # with --train_backbone: the base with the trained UNet
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
