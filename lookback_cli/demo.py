"""``python -m lookback_cli demo``: watch an image turn into a video, offline, in seconds on a CPU.

The shipped toy model (``toyworld/model/``: a tiny SD1.5-architecture checkpoint and the
look-back weights ``training/train.py`` trained on the toy world) animates the first frame of
a held-out toy-world clip, through the ``generate`` command's own code. The demo writes:

- ``start.png``: the start image (never seen in training) and ``caption.txt``;
- ``video.mp4``: the generated 16 frames;
- ``contact_sheet.png``: rows of frames side by side: generated with look-back, the same
  image and prompt through the base UNet alone (no look-back), and the true clip;

and prints the toy-world metrics of the generated clip. ``--rebuild`` first rebuilds the toy
model from nothing (``toyworld build``) and uses the rebuilt files.
"""

from __future__ import annotations

import time
from pathlib import Path

from lookback_core.atomic import write_image, write_text
from lookback_core.image_prep import to_uint8_frames
from lookback_core.weights import read_temporal_header
from toyworld import world
from toyworld.metrics import clip_metrics
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS
from toyworld.pictures import contact_sheet

from .generate import SAMPLER_FLAGS, parse_generate_args, run_generate


def run_demo(out: Path, *, clip: int = 0, rebuild: bool = False) -> dict:
    """Generate from held-out clip ``clip`` into ``out``; returns the clip's metrics."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, weights = TOY_CHECKPOINT, TOY_WEIGHTS
    if rebuild:
        from toyworld.build import build

        build(out / "build")
        checkpoint, weights = (
            out / "build" / "sd15_toy.safetensors",
            out / "build" / "lookback_toy.safetensors",
        )
    for path in (checkpoint, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the toy model is missing; rebuild it with `python -m lookback_cli demo --rebuild`"
            )
    held_out = world.make_clip(world.HELD_OUT_SEED + clip)
    start = out / "start.png"
    write_image(start, held_out.frames[0])
    write_text(out / "caption.txt", held_out.caption + "\n")
    print(f"start image: {start} (held-out clip {clip}), prompt: {held_out.caption!r}")

    started = time.time()
    command = [
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(start),
        "--prompt",
        held_out.caption,
    ]
    frames, video = run_generate(
        parse_generate_args([*command, "--weights", str(weights), "--out", str(out / "video.mp4")])
    )
    seconds = time.time() - started
    generated = to_uint8_frames(frames)
    base, _ = run_generate(
        parse_generate_args([*command, *_settings_of(weights), "--out", str(out / "base_only.mp4")])
    )
    sheet = contact_sheet({"look-back": generated, "base": to_uint8_frames(base), "truth": held_out.frames})
    write_image(out / "contact_sheet.png", sheet)

    metrics = clip_metrics(generated, held_out.frames[0], held_out.rgb, held_out.direction)
    print(f"generated in {seconds:.1f} s: {video}")
    print(f"contact sheet: {out / 'contact_sheet.png'} (rows: look-back, base UNet alone, the true clip)")
    print(
        f"this clip: frame-0 PSNR {metrics.frame0_psnr:.1f} dB, persistence {metrics.persistence:.2f}, "
        f"moved {metrics.travel:.1f} px {held_out.direction} ({'correct' if metrics.direction_ok else 'wrong'} "
        f"direction; {metrics.sideways:.1f} px sideways), speed {metrics.speed:.2f} px/frame (truth "
        f"{world.SPEED}), background drift {metrics.background_drift:.1f} levels"
    )
    return metrics.to_dict()


def _settings_of(weights: Path) -> list[str]:
    """The weights' recommended sampler settings as ``generate`` flags, so the base-only row uses them too."""
    recommended = read_temporal_header(weights).recommended_sampler
    return [text for key, value in recommended.items() for text in (SAMPLER_FLAGS[key], str(value))]
