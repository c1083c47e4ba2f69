"""On-disk cache of VAE latents and text embeddings, one safetensors file per clip.

At 256x256 the VAE encoder costs more than the UNet, so encoding each clip once pays off from
the second epoch on. Files are written to a temporary name and renamed, so a killed run never
leaves a half-written entry; an unreadable entry is recomputed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lookback_core.atomic import save_safetensors


class LatentCache:
    """``get``/``put`` of ``{"latents": [c, f, h, w], "text": [tokens, dim]}`` by clip key."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, self._path(key))
