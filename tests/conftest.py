"""Shared fixtures: tiny models of the real SD1.5 architectures (small channel counts)."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from lookback_core.tiny import TINY_UNET_CONFIG

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    return make_tiny_unet()


def randomize(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give zero-initialised look-back modules random weights, so tests see them act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
