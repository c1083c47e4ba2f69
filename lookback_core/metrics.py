"""ISIM: how similar each generated frame stays to the given image.

The paper's ISIM is the cosine similarity of each frame's CLIP image embedding to the image's.
With a local CLIP vision model (a transformers ``CLIPVisionModelWithProjection`` folder) that is
what :class:`ClipImageFeatures` computes. Without one, :func:`latent_features` uses the VAE
latents instead; its numbers are reported as ``isim_latent`` and are not comparable with the
paper's Table 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def isim_curve(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``features`` ``[f, d]`` to ``reference`` ``[d]``: ``[f]``."""
    return F.cosine_similarity(features.float(), reference.float()[None], dim=-1)


def isim_summary(curve: torch.Tensor) -> dict[str, float]:
    """First, mean and decay (minus the least-squares slope per frame) of an ISIM curve."""
    f = curve.shape[0]
    x = torch.arange(f, dtype=torch.float64)
    y = curve.double()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1e-12)
    return {"first": float(y[0]), "avg": float(y.mean()), "decay": float(-slope) if f > 1 else 0.0}


def latent_features(latents: torch.Tensor) -> torch.Tensor:
    """``[c, f, h, w]`` latents to ``[f, c*h*w]`` features (the fallback feature space)."""
    return latents.permute(1, 0, 2, 3).flatten(1)


class ClipImageFeatures:
    """CLIP image embeddings of frames ``[f, 3, h, w]`` in ``[0, 1]``, from a local model folder."""

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPVisionModelWithProjection

        self.model = (
            CLIPVisionModelWithProjection.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        )
        self.size = int(self.model.config.image_size)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = F.interpolate(frames.float(), size=(self.size, self.size), mode="bicubic", antialias=True).clamp(
            0, 1
        )
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(device=param.device, dtype=param.dtype)
        return self.model(pixel_values=x).image_embeds.float().cpu()
