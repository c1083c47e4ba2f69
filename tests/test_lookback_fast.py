"""The fast look-back recurrence equals the literal loop (fp64), in inference and in training.

``lookback_recurrence`` (one conv per existing earlier output, current-frame term batched) is
checked against ``lookback_reference`` under no_grad, inference_mode and autograd, gradients
included, for every padding mode and for depths 1 to 5.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize

from benchmarks.bench_recurrence import kept_for_backward
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
def test_recurrence_matches_reference_without_autograd(
    depth: int, kernel: int, frames: int, padding: str, mode: str
) -> None:
    module, x = _setup(depth, kernel, frames, padding)
    with torch.no_grad():
        ref = lookback_reference(x, module.lookback.conv_weight(), module.lookback.bias, padding)
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
def test_recurrence_matches_reference_with_gradients(
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


def test_gradients_reach_the_frames_through_frozen_weights() -> None:
    # Frozen weights, frames that need grad (a module behind a trained one): gradients must flow.
    module, x = _setup(3, 3, 5, "zeros")
    module.requires_grad_(False)
    x.requires_grad_(True)
    out = lookback_recurrence(x, module.lookback.weight, module.lookback.bias)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    lookback_reference(x, module.lookback.conv_weight(), module.lookback.bias).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)


def test_training_keeps_no_weight_copies_for_backward() -> None:
    # Weights far larger than the activations: a contiguous copy of the weight parts kept for
    # backward would show as ~a weight's worth of extra bytes (10.4 GB at the paper preset).
    module = LookBackModule(32, LookBackConfig(depth=5, kernel=5))
    randomize(module, seed=1, scale=0.1)
    x = torch.randn(1, 4, 32, 2, 2, requires_grad=True)
    out, kept = kept_for_backward(
        lambda: lookback_recurrence(x, module.lookback.weight, module.lookback.bias),
        (x, *module.parameters()),
    )
    frames_bytes = x.numel() * x.element_size()
    assert module.lookback.weight.numel() * 4 > 50 * frames_bytes
    assert kept <= 4 * frames_bytes, f"kept {kept} bytes for backward"
    out.sum().backward()
    assert module.lookback.weight.grad is not None and module.lookback.weight.grad.abs().sum() > 0


def test_backward_unbinds_the_weight_blocks_once() -> None:
    # Indexing blocks[j] at every conv would make each conv's backward write its gradient into
    # a zero tensor of the whole weight (819 MB per conv at the paper preset's deep sites):
    # exactly one node, an unbind, may read the weight.
    module, x = _setup(3, 3, 6, "zeros")
    weight = module.lookback.weight
    out = lookback_recurrence(x, weight, module.lookback.bias)
    readers, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if getattr(child, "variable", None) is weight:
                readers.append(type(node).__name__)
            todo.append(child)
    assert readers == ["UnbindBackward0"], readers
