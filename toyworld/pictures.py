"""The toy world's pictures, drawn with PIL: line plots of per-frame curves (ISIM, drift), one line
per model, and contact sheets (rows of frames side by side)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def plot_curves(
    curves: dict[str, list[float]],
    title: str = "ISIM (latent) to frame 0",
    y_max: float | None = 1.0,
    size: tuple[int, int] = (720, 420),
) -> Image.Image:
    """Each curve against frame index, with a y axis from 0 to ``y_max`` (None: the largest value,
    rounded up), a legend and ``title``."""
    width, height = size
    left, right, top, bottom = 50, 230, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    frames = max(len(c) for c in curves.values())
    if y_max is None:
        finite = [v for c in curves.values() for v in c if math.isfinite(v)]
        y_max = _nice_ceiling(max(finite, default=1.0))

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / max(frames - 1, 1)
        y = top + (height - top - bottom) * (1 - float(np.clip(value / y_max, 0, 1)))
        return x, y

    for tick in np.linspace(0, y_max, 6):
        draw.line([point(0, tick), point(frames - 1, tick)], fill=(225, 225, 225))
        draw.text((8, point(0, tick)[1] - 6), f"{tick:.3g}", fill="black")
    for i in range(frames):
        draw.text((point(i, 0)[0] - 4, height - bottom + 6), str(i), fill="black")
    draw.text((left, height - 16), "frame", fill="black")
    draw.text((left, 4), title, fill="black")
    y = top
    for k, (name, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        draw.line([point(i, v) for i, v in enumerate(curve)], fill=colour, width=2)
        draw.line([(width - right + 10, y + 6), (width - right + 30, y + 6)], fill=colour, width=3)
        for line in _wrapped(draw, name, right - 40):  # a long name takes lines, not the image's edge
            draw.text((width - right + 36, y), line, fill="black")
            y += 12
        y += 6
    return image


def _wrapped(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` px (at word breaks; a single longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


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
