"""On-disk cache of VAE latents and text embeddings, one safetensors file per clip.

At 256x256 the VAE encoder costs more than the UNet, so encoding each clip once pays off from
the second epoch on. Files are written to a temporary name and renamed, so a killed run never
leaves a half-written entry; an unreadable entry is recomputed.

Entries live under a folder named for what produced them (:func:`encoder_fingerprint`: the VAE
and text encoder's weights, dtype and config), and each entry's name covers the clip's video,
caption, frames, stride and resolution (``training.data.clip_key``): a cache made with another
base checkpoint, VAE, caption or resolution is never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lookback_core.atomic import save_safetensors


def encoder_fingerprint(*modules: nn.Module) -> str:
    """A hash of the modules' configs and weights (names, dtypes and values)."""
    digest = hashlib.sha256()
    for module in modules:
        config = getattr(module, "config", None)
        config = (
            config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        )  # transformers / diffusers
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """``get``/``put`` of ``{"latents": [c, f, h, w], "text": [tokens, dim]}`` by clip key, under
    ``<root>/<fingerprint>/`` (the encoders that made them)."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.folder = Path(root) / fingerprint
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
