"""The given image: load it, fit it to a size the VAE and UNet accept, and frames back to uint8.

Images are ``[b, 3, h, w]`` float tensors in ``[0, 1]``, RGB. Sizes in messages are width x height.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .atomic import file_problem
from .video_io import _uint8_frames, rgb_array

EXIF_ORIENTATION = 0x0112
MIN_SIZE = 64  # SD1.5: the VAE divides by 8 and the UNet halves 3 times, so 64 px is 1 cell at its deepest


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as ``[1, 3, h, w]`` float in ``[0, 1]``, RGB.

    The EXIF orientation is applied, transparency is composited on white, grayscale (8 or 16 bit)
    becomes RGB, and an animated file gives its first frame.
    """
    file = Path(path)
    problem = file_problem(file)
    if problem:
        problem = "does not exist" if problem == "no such file" else problem
        raise FileNotFoundError(f"image file '{path}' {problem}")
    try:
        with Image.open(file) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                # 16-bit grayscale: Pillow's RGB conversion would clip it to 8 bits.
                gray = np.asarray(image, dtype=np.float32) / (1.0 if image.mode == "F" else 65535.0)
                if not np.isfinite(gray).all():  # a float TIFF: named now, not as a NaN video after sampling
                    raise ValueError(
                        f"{int(np.size(gray) - np.isfinite(gray).sum())} pixels are NaN or infinite; expected "
                        "finite pixel values"
                    )
                pixels = torch.from_numpy(np.clip(gray, 0.0, 1.0)).expand(3, -1, -1)
                return pixels.unsqueeze(0).contiguous()
            rgb = rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image '{path}': {error}") from error
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def fit_to_multiple(
    image: torch.Tensor,
    *,
    width: int | None = None,
    height: int | None = None,
    multiple: int = 8,
    mode: Literal["crop", "resize"] = "crop",
    min_size: int = MIN_SIZE,
) -> tuple[torch.Tensor, str | None]:
    """Fit ``image`` ``[b, 3, h, w]`` to a size whose sides are multiples of ``multiple``.

    With ``width`` and/or ``height`` (a missing one follows the aspect ratio; targets are rounded
    down to the multiple): ``mode="crop"`` resizes so the image covers the target and centre-crops
    the rest (aspect kept, as the paper's centre crop), ``mode="resize"`` stretches to the target.
    Without them, an image whose sides are not multiples is centre-cropped (``crop``) or resized
    (``resize``) down to the nearest multiples. Returns the image and a message saying what was
    done, or ``None`` when it was already the right size. Raises ``ValueError`` when a side
    would be under ``min_size`` pixels.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a [batch, 3, height, width] tensor, got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point in [0, 1], got dtype {image.dtype}")
    if mode not in ("crop", "resize"):
        raise ValueError(f"mode must be 'crop' or 'resize', got {mode!r}")
    if not (isinstance(multiple, int) and multiple >= 1):
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    h, w = image.shape[-2:]
    target_w, target_h = fitted_size(w, h, width=width, height=height, multiple=multiple, min_size=min_size)
    if (target_w, target_h) == (w, h):
        return image, None
    if width is None and height is None:
        if mode == "crop":
            out, done = _centre_crop(image, target_w, target_h), "centre-cropped"
        else:
            out, done = _resize(image, target_w, target_h), "resized"
        return out, f"image {w}x{h} is not a multiple of {multiple}; {done} to {target_w}x{target_h}"
    if mode == "resize":
        return _resize(image, target_w, target_h), f"image {w}x{h} resized to {target_w}x{target_h}"
    scale = max(target_w / w, target_h / h)
    cover_w, cover_h = max(target_w, _round_half_up(w * scale)), max(target_h, _round_half_up(h * scale))
    out = _centre_crop(_resize(image, cover_w, cover_h), target_w, target_h)
    if (cover_w, cover_h) == (target_w, target_h):
        return out, f"image {w}x{h} resized to {target_w}x{target_h}"
    if (cover_w, cover_h) == (w, h):
        return out, f"image {w}x{h} centre-cropped to {target_w}x{target_h}"
    return out, f"image {w}x{h} resized to {cover_w}x{cover_h} and centre-cropped to {target_w}x{target_h}"


def fitted_size(
    w: int,
    h: int,
    *,
    width: int | None = None,
    height: int | None = None,
    multiple: int = 8,
    min_size: int = MIN_SIZE,
) -> tuple[int, int]:
    """The size :func:`fit_to_multiple` gives an image of ``w`` x ``h``; raises ``ValueError`` if too small."""
    if width is None and height is None:
        target = (w - w % multiple, h - h % multiple)
        what = f"image size {w}x{h}" + (
            "" if target == (w, h) else f" (to multiples of {multiple}: {target[0]}x{target[1]})"
        )
    else:
        target_w = width if width is not None else _round_half_up(w * height / h)
        target_h = height if height is not None else _round_half_up(h * width / w)
        target = (target_w - target_w % multiple, target_h - target_h % multiple)
        what = f"requested size {target[0]}x{target[1]} (width={width}, height={height}, image {w}x{h})"
    if min(target) < min_size:
        raise ValueError(f"{what} is too small: each side must be at least {min_size} pixels")
    return target


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """An image file's width and height as :func:`load_image` will see them, read from its header only.

    A PNG's EXIF may sit in a chunk after the pixel data, and Pillow's ``getexif`` would decode
    the whole image to look for it; for PNG only EXIF found before the pixels is read (a
    quarter-turn EXIF after them swaps the size the memory estimate sees, nothing else)."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            if image.format == "PNG":
                exif = Image.Exif()
                if "exif" in image.info:
                    exif.load(image.info["exif"])
            else:
                exif = image.getexif()
            orientation = exif.get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image '{path}': {error}") from error
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # these orientations turn it a quarter


def to_uint8_frames(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Frames ``[f, 3, h, w]`` or ``[f, h, w, 3]`` in ``[0, 1]`` (or uint8) to uint8 ``[f, h, w, 3]``."""
    channels_first = (
        isinstance(images, (torch.Tensor, np.ndarray))
        and images.ndim == 4
        and images.shape[1] == 3
        and images.shape[-1] != 3
    )
    if channels_first:
        images = (
            images.permute(0, 2, 3, 1) if isinstance(images, torch.Tensor) else images.transpose(0, 2, 3, 1)
        )
    return _uint8_frames(images, "images")


def _resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    if image.shape[-2:] == (height, width):
        return image
    # bicubic with antialias (a proper low-pass when shrinking) is defined for float32 on every device
    out = F.interpolate(
        image.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return out.clamp(0.0, 1.0).to(image.dtype)


def _centre_crop(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return image[..., top : top + height, left : left + width]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
