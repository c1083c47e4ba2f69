"""The latent space every front end works in.

The paper's ``z`` is the VAE posterior mean times the VAE's *scaling factor*: the factor the
checkpoint's VAE config records, which gives its latents about unit variance (SD1.5's VAE:
0.18215; the shipped toy VAE: 1.032). The base UNet learned to denoise latents of that scale, so
the trainer, its latent cache, the sampler's start latent, decoding and the toy evaluation all
take the scale from :func:`latent_scale`, and temporal weights record the scale they were
trained at (``training.latent_scale``) so a front end can refuse a base that scales otherwise.
ComfyUI applies the same factor through its model's latent format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SCALE_TOLERANCE = 1e-4  # relative: fp16 storage of a recorded scale stays well inside it


def latent_scale(vae: nn.Module | Mapping[str, Any]) -> float:
    """The scaling factor of a diffusers VAE (or of its config dict)."""
    config = vae if isinstance(vae, Mapping) else vae.config
    return float(config["scaling_factor"])


def same_scale(a: float, b: float) -> bool:
    return abs(a - b) <= SCALE_TOLERANCE * max(abs(a), abs(b))


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[n, 3, h, w]`` pixels in ``[-1, 1]`` to scaled latents ``[n, 4, h/8, w/8]`` (the posterior mean)."""
    param = next(vae.parameters())
    return vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mean * latent_scale(vae)


@torch.no_grad()
def decode_pixels(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[n, 4, h, w]`` to pixels ``[n, 3, 8h, 8w]`` in about ``[-1, 1]``."""
    param = next(vae.parameters())
    return vae.decode(latents.to(device=param.device, dtype=param.dtype) / latent_scale(vae)).sample
