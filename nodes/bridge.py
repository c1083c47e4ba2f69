"""Conversions between ComfyUI's types and ``lookback_core``'s, free of host imports.

- CONDITIONING: ``[[embeddings [1, tokens, 768], {...}], ...]``;
- LATENT: ``{"samples": [n, 4, h, w]}`` in the VAE's raw space; ComfyUI scales SD1.5 latents by
  0.18215 (its ``latent_format.process_in``) only while sampling, and ``lookback_core`` always
  works in that scaled space;
- IMAGE: ``[n, h, w, 3]`` floats in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from einops import rearrange

SD15_LATENT_SCALE = 0.18215


def conditioning_embeddings(conditioning: list, name: str, context_dim: int) -> torch.Tensor:
    """The prompt embeddings ``[1, tokens, dim]`` of a CONDITIONING input."""
    if not conditioning:
        raise ValueError(f"{name}: the conditioning is empty; connect a CLIP Text Encode node")
    embeddings = conditioning[0][0]
    if embeddings.ndim != 3 or embeddings.shape[-1] != context_dim:
        raise ValueError(
            f"{name}: conditioning of shape {tuple(embeddings.shape)} does not fit this SD1.5 UNet "
            f"(expected [1, tokens, {context_dim}]); encode the prompt with the same checkpoint's CLIP"
        )
    return embeddings[:1]


def latent_in(samples: torch.Tensor) -> torch.Tensor:
    """A ComfyUI LATENT's samples to ``lookback_core``'s scaled space."""
    return samples * SD15_LATENT_SCALE


def video_latent_out(latents: torch.Tensor) -> dict:
    """``[b, c, f, h, w]`` scaled latents to a LATENT of ``b * f`` frames, in frame order."""
    samples = rearrange(latents, "b c f h w -> (b f) c h w") / SD15_LATENT_SCALE
    return {"samples": samples.float().cpu()}


def crop_to_multiple_of_8(image: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Centre-crop an IMAGE so its sides are multiples of 8 (what the VAE needs)."""
    n, h, w, _ = image.shape
    nh, nw = h - h % 8, w - w % 8
    if nh < 8 or nw < 8:
        raise ValueError(f"image: {w}x{h} is too small; the start image needs at least 8x8 pixels")
    if (nh, nw) == (h, w):
        return image, None
    top, left = (h - nh) // 2, (w - nw) // 2
    message = f"image {w}x{h} is not a multiple of 8; centre-cropped to {nw}x{nh}"
    return image[:, top : top + nh, left : left + nw], message
