"""Temporal attention at the sites: the ablation's alternative to the look-back (issue 33)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_unet, randomize, train_args
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from lookback_core.config import LookBackConfig
from lookback_core.lookback import LookBackModule
from lookback_core.temporal_attention import MAX_ATTENTION_FRAMES
from lookback_core.temporal_unet import create_lookback_unet
from lookback_core.weights import load_lookback_unet, read_temporal_header, save_temporal_weights
from training import checkpoints
from training.args import module_config, parse_args
from training.train import main as train_main

ATTENTION_ONLY = dict(depth=3, kernel=3, lookback=False, adapter=False, channel_mix=False)


def _module(mode: str, channels: int = 64) -> LookBackModule:
    torch.manual_seed(0)
    return LookBackModule(channels, LookBackConfig(**ATTENTION_ONLY, temporal_attention=mode))


@pytest.mark.parametrize("mode", ["full", "causal"])
def test_a_new_attention_module_is_diffusers_motion_module_and_the_identity(mode) -> None:
    module = _module(mode)
    assert isinstance(module.attention.motion, AnimateDiffTransformer3D)
    x = torch.randn(2 * 5, 64, 4, 4)
    assert torch.equal(module(x, 5), x)  # its output projection starts at zero


@pytest.mark.parametrize(("mode", "earlier_frames_see_later"), [("full", True), ("causal", False)])
def test_causal_attention_never_lets_a_frame_see_a_later_one(mode, earlier_frames_see_later) -> None:
    module = _module(mode)
    randomize(module, scale=0.1)
    x = torch.randn(2, 6, 64, 4, 4)
    later_changed = x.clone()
    later_changed[:, 4:] += 1.0
    out, changed = (module(v.flatten(0, 1), 6).view(2, 6, 64, 4, 4) for v in (x, later_changed))
    earlier = (changed[:, :4] - out[:, :4]).abs().max()
    assert (earlier > 1e-3) == earlier_frames_see_later, earlier
    assert (changed[:, 4:] - out[:, 4:]).abs().max() > 1e-3  # the changed frames themselves do change


def test_attention_refuses_more_frames_than_its_positions_and_channels_its_heads_cannot_split() -> None:
    module = _module("full", channels=32)
    with pytest.raises(ValueError, match=f"knows {MAX_ATTENTION_FRAMES} frame positions; 65 frames"):
        module(torch.randn(65, 32, 2, 2), 65)
    with pytest.raises(ValueError, match="divisible by its 8 heads and 32 norm groups; this site has 40"):
        _module("full", channels=40)


@pytest.mark.parametrize("mode", ["full", "causal"])
def test_attention_weights_round_trip_through_a_weights_file(tmp_path, mode) -> None:
    config = LookBackConfig(depth=2, kernel=3, first_frame_anchor=True, temporal_attention=mode)
    model = create_lookback_unet(make_tiny_unet(), config)
    randomize(model.temporal)
    path = save_temporal_weights(tmp_path / "w.safetensors", model)
    assert read_temporal_header(path).config.temporal_attention == mode
    loaded = load_lookback_unet(path, make_tiny_unet())
    sample, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 10, text), model(sample, 10, text))


def test_the_trainer_trains_temporal_attention_alone(setup, tmp_path) -> None:
    alone = ["--no_lookback_conv", "--no_adapter", "--no_channel_mix", "--temporal_attention", "causal"]
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "2", *alone)
    config = module_config(parse_args(args))
    assert (
        not (config.lookback or config.adapter or config.channel_mix)
        and config.temporal_attention == "causal"
    )
    assert train_main(args) == 0
    header = read_temporal_header(out / checkpoints.WEIGHTS_NAME)
    assert header.config.temporal_attention == "causal" and not header.config.lookback
    trained = load_lookback_unet(out / checkpoints.WEIGHTS_NAME, make_tiny_unet())
    assert any(p.abs().sum() > 0 for n, p in trained.temporal.named_parameters() if "proj_out" in n)
