"""From an image and a prompt to video frames: the steps every front end shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .latents import decode_pixels, encode_latents
from .long_video import sample_long_video
from .sampler import SamplerSettings, StepCallback
from .temporal_unet import LookBackUNet


@torch.no_grad()
def encode_image_latent(vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The paper's ``z0``: VAE posterior mean times the VAE scaling factor (:mod:`lookback_core.latents`).

    ``image``: ``[b, 3, h, w]`` in ``[0, 1]`` with ``h`` and ``w`` multiples of 8.
    Returns ``[b, 4, h/8, w/8]``.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [b, 3, h, w], got shape {tuple(image.shape)}")
    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {tuple(image.shape[-2:])}")
    return encode_latents(vae, image * 2 - 1)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, *, frames_per_batch: int = 8) -> torch.Tensor:
    """Decode ``[b, c, f, h, w]`` latents to ``[b, f, 3, 8h, 8w]`` images in ``[0, 1]``.

    Frames are decoded ``frames_per_batch`` at a time so memory does not grow with ``f``.
    """
    b = latents.shape[0]
    flat = rearrange(latents, "b c f h w -> (b f) c h w")
    images = [decode_pixels(vae, chunk).float().cpu() for chunk in flat.split(frames_per_batch)]
    out = (torch.cat(images) / 2 + 0.5).clamp(0, 1)
    return rearrange(out, "(b f) c h w -> b f c h w", b=b)


def generate_latents(
    model: LookBackUNet,
    vae: nn.Module,
    image: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    num_frames: int,
    settings: SamplerSettings,
    scheduler_config: dict,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    chunk_frames: int | None = None,
    context_frames: int | None = None,
) -> torch.Tensor:
    """Image ``[1, 3, h, w]`` in ``[0, 1]`` to latents ``[1, c, f, h/8, w/8]``; frame 0 is the image's ``z0``.

    With ``chunk_frames``, videos longer than that are sampled in chunks that pin
    ``context_frames`` frames of the previous chunk (default: the look-back depth d), so the
    model's memory does not grow with the length.
    """
    z0 = encode_image_latent(vae, image)
    param = next(model.unet.parameters())
    return sample_long_video(
        model,
        z0.to(param.dtype),
        positive.to(device=param.device, dtype=param.dtype),
        None if negative is None else negative.to(device=param.device, dtype=param.dtype),
        num_frames,
        settings,
        scheduler_config,
        chunk_frames=chunk_frames,
        context_frames=context_frames,
        on_step=on_step,
        should_cancel=should_cancel,
    )


def generate_video(
    model: LookBackUNet, vae: nn.Module, image: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """:func:`generate_latents`, decoded: frames ``[f, 3, h, w]`` in ``[0, 1]``; frame 0 is the image."""
    return decode_latents(vae, generate_latents(model, vae, image, *args, **kwargs))[0]
