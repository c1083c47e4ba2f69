"""Both fast paths of the look-back recurrence equal the literal loop (fp64), gradients included.

``lookback_recurrence`` takes a buffer-view path when no autograd is needed (inference) and a
concatenating path when it is (training); each is checked against ``lookback_reference``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize

from lookback_core.config import LookBackConfig
from lookback_core.lookback import LookBackModule, lookback_recurrence, lookback_reference

CASES = [
    (5, 5, 9, "zeros"),
    (3, 3, 2, "zeros"),
    (5, 3, 3, "reflect"),
    (2, 3, 6, "replicate"),
    (1, 3, 4, "zeros"),
]


def _setup(depth: int, kernel: int, frames: int, padding: str, batch: int = 2, n: int = 4):
    module = LookBackModule(n, LookBackConfig(depth=depth, kernel=kernel, padding_mode=padding))
    randomize(module, seed=depth * 10 + frames, scale=0.1)
    module = module.double()
    x = torch.randn(
        batch, frames, n, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(frames)
    )
    return module, x


@pytest.mark.parametrize(("depth", "kernel", "frames", "padding"), CASES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_buffer_path_matches_reference(depth: int, kernel: int, frames: int, padding: str, mode: str) -> None:
    module, x = _setup(depth, kernel, frames, padding)
    with torch.no_grad():
        ref = lookback_reference(x, module.lookback, depth)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        fast = lookback_recurrence(x, module.lookback.weight, module.lookback.bias, padding)
        whole = module(x.flatten(0, 1), frames)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            whole, module.forward_reference(x.flatten(0, 1), frames), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize(("depth", "kernel", "frames", "padding"), CASES)
def test_autograd_path_matches_reference_with_gradients(
    depth: int, kernel: int, frames: int, padding: str
) -> None:
    module, x = _setup(depth, kernel, frames, padding)
    x.requires_grad_(True)
    target = torch.randn_like(x)
    results = []
    for forward in (module.forward, module.forward_reference):
        x.grad = None
        module.zero_grad()
        out = forward(x.flatten(0, 1), frames)
        (out * target.flatten(0, 1)).sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autograd_path_is_taken_for_inputs_that_need_grad() -> None:
    # Only the frames need grad (frozen weights): the in-place buffer path must not be used.
    module, x = _setup(3, 3, 5, "zeros")
    module.requires_grad_(False)
    x.requires_grad_(True)
    out = lookback_recurrence(x, module.lookback.weight, module.lookback.bias)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    lookback_reference(x, module.lookback, 3).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
