"""The look-back module: identity at init, fast recurrence == literal loop, causality."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize

from lookback_core.config import LookBackConfig
from lookback_core.lookback import LookBackModule, lookback_recurrence, lookback_reference


def _module(n: int = 6, **kw) -> LookBackModule:
    module = LookBackModule(n, LookBackConfig(**kw))
    randomize(module, scale=0.1)
    return module


def test_new_module_is_identity() -> None:
    module = LookBackModule(6, LookBackConfig())
    x = torch.randn(2 * 7, 6, 9, 9)
    assert torch.equal(module(x, 7), x)


@pytest.mark.parametrize(
    ("depth", "kernel", "frames", "padding"),
    [(5, 5, 9, "zeros"), (3, 3, 4, "zeros"), (1, 3, 5, "zeros"), (5, 3, 2, "zeros"), (3, 3, 7, "reflect")],
)
def test_fast_recurrence_matches_reference(depth: int, kernel: int, frames: int, padding: str) -> None:
    module = _module(depth=depth, kernel=kernel, padding_mode=padding)
    x = torch.randn(3 * frames, 6, 8, 8, dtype=torch.float64)
    module = module.double()
    fast = module(x, frames)
    ref = module.forward_reference(x, frames)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    # and the recurrence alone, without mix/adapter
    frames_x = x.reshape(3, frames, 6, 8, 8)
    torch.testing.assert_close(
        lookback_recurrence(frames_x, module.lookback.weight, module.lookback.bias, padding),
        lookback_reference(frames_x, module.lookback.conv_weight(), module.lookback.bias, padding),
        rtol=1e-10,
        atol=1e-10,
    )


def test_fast_recurrence_gradients_match_reference() -> None:
    module = _module(depth=3, kernel=3).double()
    x = torch.randn(2 * 5, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    module(x, 5).square().sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    module.forward_reference(x, 5).square().sum().backward()
    ref = [x.grad] + [p.grad for p in module.parameters()]
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_lookback_conv_is_causal() -> None:
    module = _module(depth=3, kernel=3)
    frames = torch.randn(2, 8, 6, 8, 8)
    base = lookback_recurrence(frames, module.lookback.weight, module.lookback.bias)
    for j in range(8):
        changed = frames.clone()
        changed[:, j] += torch.randn_like(changed[:, j])
        out = lookback_recurrence(changed, module.lookback.weight, module.lookback.bias)
        assert torch.equal(out[:, :j], base[:, :j]), f"changing frame {j} changed an earlier frame"
        assert not torch.equal(out[:, j:], base[:, j:])


def test_recurrence_reaches_beyond_depth_in_one_layer() -> None:
    # out[i-1] is the updated state, so frame 0 influences the last frame even when f > d.
    module = _module(depth=2, kernel=3)
    frames = torch.randn(1, 6, 6, 8, 8)
    base = lookback_recurrence(frames, module.lookback.weight, module.lookback.bias)
    changed = frames.clone()
    changed[:, 0] += 1.0
    out = lookback_recurrence(changed, module.lookback.weight, module.lookback.bias)
    assert not torch.allclose(out[:, -1], base[:, -1])


def test_samples_never_mix() -> None:
    module = _module(depth=3, kernel=3)
    x = torch.randn(3, 5, 6, 8, 8)
    together = module(x.reshape(15, 6, 8, 8), 5).reshape(3, 5, 6, 8, 8)
    for s in range(3):
        alone = module(x[s], 5)
        torch.testing.assert_close(together[s], alone)


def test_frame_count_must_divide_batch() -> None:
    with pytest.raises(ValueError, match="cannot hold 4 frames"):
        _module()(torch.randn(6, 6, 8, 8), 4)


def test_state_dict_holds_the_conv_layout_and_loads_back() -> None:
    # Weight files keep nn.Conv2d's [n, d*n, k, k] with window slots oldest first; the module
    # computes with [d, n, n, k, k] blocks. Both directions must agree slot by slot.
    module = _module(n=4, depth=3, kernel=3)
    state = module.state_dict()
    weight = state["lookback.weight"]
    assert weight.shape == (4, 12, 3, 3) and weight.is_contiguous()
    for j in range(3):
        assert torch.equal(weight[:, 4 * j : 4 * (j + 1)], module.lookback.weight[j])
    fresh = LookBackModule(4, LookBackConfig(depth=3, kernel=3))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.lookback.weight, module.lookback.weight)
    x = torch.randn(2 * 5, 4, 6, 6)
    torch.testing.assert_close(fresh(x, 5), module.forward_reference(x, 5), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch for lookback.weight"):
        fresh.load_state_dict({**state, "lookback.weight": weight[:, :-1]})


@pytest.mark.parametrize(("depth", "frames"), [(3, 6), (1, 4), (2, 2)])
def test_first_frame_anchor_fast_matches_reference(depth: int, frames: int) -> None:
    module = _module(depth=depth, kernel=3, first_frame_anchor=True).double()
    x = torch.randn(2 * frames, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    fast = module(x, frames)
    fast.square().sum().backward()
    fast_grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    ref = module.forward_reference(x, frames)
    ref.square().sum().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast_grads, [x.grad] + [p.grad for p in module.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_first_frame_anchor_puts_every_frame_one_hop_from_frame_0() -> None:
    # With d=1 the look-back conv reads only the frame itself: frame 0 reaches later frames
    # through the anchor alone, and frame 0 itself is untouched by it.
    x = torch.randn(1, 5, 6, 8, 8)
    for anchored in (False, True):
        module = _module(depth=1, kernel=3, first_frame_anchor=anchored, channel_mix=False, adapter=False)
        changed = x.clone()
        changed[:, 0] += 1.0
        base, out = module(x.flatten(0, 1), 5), module(changed.flatten(0, 1), 5)
        assert torch.equal(out[1:], base[1:]) is not anchored
    plain = _module(depth=1, kernel=3, channel_mix=False, adapter=False)
    anchored = LookBackModule(
        6, LookBackConfig(depth=1, kernel=3, first_frame_anchor=True, channel_mix=False, adapter=False)
    )
    anchored.load_state_dict(
        {**plain.state_dict(), **{k: v for k, v in anchored.state_dict().items() if k.startswith("anchor")}}
    )
    # a new anchor starts at zero: the module is the paper's until trained
    assert torch.equal(anchored(x.flatten(0, 1), 5), plain(x.flatten(0, 1), 5))


def test_first_frame_anchor_config_is_optional_in_files_and_needs_the_lookback_conv() -> None:
    old = json.loads(LookBackConfig().to_json())
    del old["first_frame_anchor"]  # a file written before the anchor existed
    assert LookBackConfig.from_json(json.dumps(old)).first_frame_anchor is False
    assert "anchor.weight" not in LookBackModule(6, LookBackConfig()).state_dict()
    with pytest.raises(ValueError, match="first_frame_anchor .* needs lookback"):
        LookBackConfig(first_frame_anchor=True, lookback=False)
