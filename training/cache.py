"""On-disk cache of VAE latents and text embeddings, one safetensors file per clip.

At 256x256 the VAE encoder costs more than the UNet, so encoding each clip once pays off from
the second epoch on. Files are written to a temporary name and renamed, so a killed run never
leaves a half-written entry; an unreadable entry is recomputed.

Entries live under a folder named for what produced them (:func:`checkpoint_fingerprint`: the
VAE's and the text encoder's weights as the checkpoint file holds them, their configs and the
dtype they run in), and each entry's name covers the clip's video, caption, window, frames,
stride and size (``training.data.clip_key``): a cache made with another base checkpoint, VAE,
caption or clip setting is never reused.

The cache step (``train.py --cache_only``) encodes every clip window of the run's datasets (and
the empty caption, the validation prompts and images) and then writes a *manifest*: which entry
each clip window of those settings is (:func:`cache_settings`). A run that finds the manifest of
its settings trains from the cache alone, without loading the VAE encoder or the text encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lookback_core.atomic import save_safetensors, write_text
from lookback_core.checkpoint_file import TEXT_PREFIX, VAE_PREFIX, read_checkpoint
from lookback_core.pipeline import encode_image_latent
from lookback_core.prompts import encode_prompt
from lookback_core.sd15 import SD15Components, read_model_configs

MANIFESTS = "manifests"


def checkpoint_fingerprint(path: str | Path, config_dir: str | Path | None, dtype: torch.dtype) -> str:
    """A hash of the VAE's and the text encoder's configs and weights in the checkpoint at
    ``path`` and of the ``dtype`` they encode in, read from the file without building either."""
    configs = read_model_configs(path, config_dir)
    digest = hashlib.sha256()
    for part in ("vae", "text_encoder"):
        digest.update(json.dumps(configs.configs[part], sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    prefixes = (VAE_PREFIX, TEXT_PREFIX)

    def add(name: str, tensor: torch.Tensor) -> None:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    if Path(path).suffix.lower() == ".safetensors":
        with safe_open(path, framework="pt") as f:
            for name in sorted(k for k in f.keys() if k.startswith(prefixes)):  # noqa: SIM118
                add(name, f.get_tensor(name))
    else:  # a .ckpt is read whole
        state, _ = read_checkpoint(Path(path))
        for name in sorted(k for k in state if k.startswith(prefixes)):
            add(name, state[name])
    return digest.hexdigest()[:16]


def cache_settings(facts: dict[str, Any]) -> str:
    """The name of a manifest: a hash of everything that decides which clips a run encodes."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_key(text: str) -> str:
    return "prompt-" + hashlib.sha1(text.encode()).hexdigest()


def image_key(path: str | Path, width: int, height: int) -> str:
    """A validation image's latent at one size, by the file's content."""
    return f"image-{hashlib.sha1(Path(path).read_bytes()).hexdigest()}-{width}x{height}"


class LatentCache:
    """``get``/``put`` of ``{"latents": [c, f, h, w], "text": [tokens, dim]}`` by clip key (and of
    prompts' ``{"text"}`` and images' ``{"latents"}``), under ``<root>/<fingerprint>/`` (the
    encoders that made them); and the manifests of the cache step."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.folder = Path(root) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

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

    def manifest_path(self, settings: str) -> Path:
        return self.folder / MANIFESTS / f"{settings}.json"

    def manifest(self, settings: str) -> dict | None:
        """The cache step's manifest for ``settings`` (:func:`cache_settings`), or ``None`` when that
        step has not finished for them."""
        path = self.manifest_path(settings)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_manifest(self, settings: str, manifest: dict) -> Path:
        path = self.manifest_path(settings)
        write_text(path, json.dumps(manifest))
        return path


class Encoders:
    """The VAE encoder and the text encoder as a run has them: the components' own, or the cache
    step's entries where the run was loaded without them (validation images' first-frame latents,
    prompts' embeddings; ``cache``: where those entries are)."""

    def __init__(self, components: SD15Components, cache: LatentCache | None = None) -> None:
        self.components, self.cache = components, cache

    def _entry(self, key: str, what: str) -> dict[str, torch.Tensor]:
        entry = self.cache.get(key) if self.cache is not None else None
        if entry is None:
            raise RuntimeError(
                f"{what} is not in the cache and its encoder is not loaded; run the cache step again (--cache_only)"
            )
        return entry

    def image_latent(self, path: str | Path, image: torch.Tensor) -> torch.Tensor:
        """``image`` (``path``'s, fitted to its size: ``[1, 3, h, w]`` in [0, 1]) as its latent."""
        vae = self.components.vae
        if vae.encoder is not None:
            return encode_image_latent(vae, image.to(vae.device, vae.dtype))
        height, width = image.shape[-2:]
        return self._entry(image_key(path, width, height), f"the validation image {path}")["latents"]

    def prompts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """``texts``' embeddings ``[n, tokens, dim]``."""
        if self.components.text_encoder is not None:
            return encode_prompt(self.components.tokenizer, self.components.text_encoder, texts, device)
        return torch.stack([self._entry(prompt_key(t), f"the prompt {t!r}")["text"] for t in texts]).to(
            device
        )
