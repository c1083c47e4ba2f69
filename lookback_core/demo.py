"""``python -m lookback_core demo``: watch an image turn into a video, offline, in seconds on a CPU.

The shipped toy model (``lookback_core/toy/``: a tiny SD1.5-architecture checkpoint and the
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

import imageio.v3 as iio
import numpy as np

from . import toyworld
from .image_prep import to_uint8_frames
from .toy import TOY_CHECKPOINT, TOY_WEIGHTS
from .toymetrics import clip_metrics

LABEL_WIDTH = 4  # px of colour bar left of each contact-sheet row: green look-back, grey base, white truth
ROW_COLOURS = {"look-back": (40, 200, 60), "base": (128, 128, 128), "truth": (255, 255, 255)}


def contact_sheet(rows: dict[str, np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows of frames ``[f, h, w, 3]`` uint8 side by side, each row led by a colour bar; upscaled ``scale`` x."""
    tiles = []
    for name, frames in rows.items():
        f, h, w, _ = frames.shape
        row = np.full((h + gap, LABEL_WIDTH + f * (w + gap), 3), 255, dtype=np.uint8)
        row[:h, :LABEL_WIDTH] = ROW_COLOURS.get(name, (0, 0, 0))
        for i, frame in enumerate(frames):
            x = LABEL_WIDTH + i * (w + gap)
            row[:h, x : x + w] = frame
        tiles.append(row)
    sheet = np.concatenate(tiles)
    return sheet.repeat(scale, axis=0).repeat(scale, axis=1)


def run_demo(out: Path, *, clip: int = 0, rebuild: bool = False) -> dict:
    """Generate from held-out clip ``clip`` into ``out``; returns the clip's metrics."""
    from .cli import build_parser, run_generate

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, weights = TOY_CHECKPOINT, TOY_WEIGHTS
    if rebuild:
        from .toybuild import build

        build(out / "build")
        checkpoint, weights = (
            out / "build" / "sd15_toy.safetensors",
            out / "build" / "lookback_toy.safetensors",
        )
    for path in (checkpoint, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the toy model is missing; rebuild it with `python -m lookback_core demo --rebuild`"
            )
    held_out = toyworld.make_clip(toyworld.HELD_OUT_SEED + clip)
    start = out / "start.png"
    iio.imwrite(start, held_out.frames[0])
    (out / "caption.txt").write_text(held_out.caption + "\n")
    print(f"start image: {start} (held-out clip {clip}), prompt: {held_out.caption!r}")

    started = time.time()
    command = [
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(start),
        "--prompt",
        held_out.caption,
    ]
    frames, video = run_generate(
        build_parser().parse_args([*command, "--weights", str(weights), "--out", str(out / "video.mp4")])
    )
    seconds = time.time() - started
    generated = to_uint8_frames(frames)
    base, _ = run_generate(
        build_parser().parse_args([*command, *_settings_of(weights), "--out", str(out / "base_only.mp4")])
    )
    sheet = contact_sheet({"look-back": generated, "base": to_uint8_frames(base), "truth": held_out.frames})
    iio.imwrite(out / "contact_sheet.png", sheet)

    metrics = clip_metrics(generated, held_out.frames[0], held_out.rgb, held_out.direction)
    print(f"generated in {seconds:.1f} s: {video}")
    print(f"contact sheet: {out / 'contact_sheet.png'} (rows: look-back, base UNet alone, the true clip)")
    print(
        f"this clip: frame-0 PSNR {metrics.frame0_psnr:.1f} dB, persistence {metrics.persistence:.2f}, "
        f"moved {metrics.travel:.1f} px {held_out.direction} ({'correct' if metrics.direction_ok else 'wrong'} "
        f"direction; {metrics.sideways:.1f} px sideways), speed {metrics.speed:.2f} px/frame (truth "
        f"{toyworld.SPEED}), background drift {metrics.background_drift:.1f} levels"
    )
    return metrics.to_dict()


def _settings_of(weights: Path) -> list[str]:
    """The weights' recommended sampler settings as ``generate`` flags, so the base-only row uses them too."""
    from .cli import SAMPLER_FLAGS
    from .weights import read_temporal_header

    recommended = read_temporal_header(weights).recommended_sampler
    return [text for key, value in recommended.items() for text in (SAMPLER_FLAGS[key], str(value))]
