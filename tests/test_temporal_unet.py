"""Look-back modules attached to a (tiny) SD1.5-architecture diffusers UNet."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize
from einops import rearrange, repeat

from lookback_core.config import SD15_SITES, LookBackConfig, preset
from lookback_core.sites import find_sites
from lookback_core.temporal_unet import create_lookback_unet


def _inputs(b: int = 2, f: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, f, 16, 16, generator=g)
    t = torch.tensor([10, 700])[:b]
    ctx = torch.randn(b, 7, 32, generator=g)
    return x, t, ctx


def _base(unet, x, t, ctx):
    b, _, f = x.shape[:3]
    out = unet(
        rearrange(x, "b c f h w -> (b f) c h w"),
        repeat(t, "b -> (b f)", f=f),
        repeat(ctx, "b s d -> (b f) s d", f=f),
    ).sample
    return rearrange(out, "(b f) c h w -> b c f h w", b=b)


def test_sd15_layout_has_21_named_sites(tiny_unet) -> None:
    sites = find_sites(tiny_unet)
    assert tuple(sites) == SD15_SITES
    # up-samplers are part of output.2/5/8, attentions carry the cross-attn layers
    assert type(sites["output.2"].module).__name__ == "Upsample2D"
    assert type(sites["output.8"].module).__name__ == "Upsample2D"
    assert type(sites["output.11"].module).__name__ == "Transformer2DModel"
    assert type(sites["input.10"].module).__name__ == "ResnetBlock2D"
    assert sites["input.1"].channels == 32 and sites["middle"].channels == 64


def test_fresh_modules_leave_unet_output_unchanged(tiny_unet) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        expected = _base(tiny_unet, x, t, ctx)
        model = create_lookback_unet(tiny_unet, preset("paper"))
        assert torch.equal(model(x, t, ctx), expected)


def test_trained_modules_change_output_and_detach_restores_it(tiny_unet) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        expected = _base(tiny_unet, x, t, ctx)
        model = create_lookback_unet(tiny_unet, preset("light"))
        randomize(model.temporal)
        assert not torch.allclose(model(x, t, ctx), expected, atol=1e-4)
        unet = model.detach()
        assert torch.equal(_base(unet, x, t, ctx), expected)


def test_cfg_halves_and_samples_never_mix(tiny_unet) -> None:
    x, t, ctx = _inputs(b=2)
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal)
    with torch.no_grad():
        together = model(x, t, ctx)
        for s in range(2):
            alone = model(x[s : s + 1], t[s : s + 1], ctx[s : s + 1])
            torch.testing.assert_close(together[s : s + 1], alone, rtol=1e-4, atol=1e-5)


def test_first_frame_unaffected_by_later_frames_without_adapter(tiny_unet) -> None:
    # Only the adapter looks forward in time; without it the whole model is causal.
    model = create_lookback_unet(tiny_unet, LookBackConfig(depth=3, kernel=3, adapter=False))
    randomize(model.temporal)
    x, t, ctx = _inputs(b=1)
    changed = x.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])
    with torch.no_grad():
        a, b = model(x, t, ctx), model(changed, t, ctx)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def _changed_later_frames(model, first_kept: int = 2):
    x, t, ctx = _inputs(b=1)
    changed = x.clone()
    changed[:, :, first_kept:] = torch.randn_like(changed[:, :, first_kept:])
    with torch.no_grad():
        return model(x, t, ctx), model(changed, t, ctx)


def test_causal_adapter_makes_the_whole_model_causal(tiny_unet) -> None:
    causal = create_lookback_unet(tiny_unet, LookBackConfig(depth=3, kernel=3, causal_adapter=True))
    randomize(causal.temporal)
    a, b = _changed_later_frames(causal)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])
    causal.detach()
    # the paper's centred adapter lets frame 1 see frame 2 (the same weights, centred padding)
    centred = create_lookback_unet(tiny_unet, LookBackConfig(depth=3, kernel=3))
    centred.temporal.load_state_dict(causal.temporal.state_dict())
    a, b = _changed_later_frames(centred)
    assert not torch.allclose(a[:, :, 1], b[:, :, 1])


def test_adapter_only_variant_has_no_lookback_conv_and_still_mixes_frames(tiny_unet, tmp_path) -> None:
    from lookback_core.weights import load_lookback_unet, save_temporal_weights

    config = LookBackConfig(depth=3, kernel=3, lookback=False)
    model = create_lookback_unet(tiny_unet, config)
    randomize(model.temporal)
    assert not any("lookback" in name for name in model.temporal.site_state_dict())
    a, b = _changed_later_frames(model)
    assert not torch.allclose(a[:, :, 1], b[:, :, 1])  # the centred adapter reaches one frame ahead
    path = save_temporal_weights(tmp_path / "adapter_only.safetensors", model)
    expected = model.temporal.site_state_dict()
    model.detach()
    loaded = load_lookback_unet(path, tiny_unet)
    assert loaded.config.lookback is False
    for key, value in loaded.temporal.site_state_dict().items():
        torch.testing.assert_close(value, expected[key])
    with pytest.raises(
        ValueError, match="at least one of lookback, channel_mix, adapter and temporal_attention"
    ):
        LookBackConfig(lookback=False, channel_mix=False, adapter=False)


def test_bare_unet_call_with_modules_attached_is_refused(tiny_unet) -> None:
    model = create_lookback_unet(tiny_unet, preset("light"))
    x, t, ctx = _inputs(b=1, f=2)
    with pytest.raises(RuntimeError, match="without a frame count"):
        tiny_unet(x[:, :, 0], t, ctx)
    assert model(x, t, ctx).shape == x.shape


def test_site_subset_preset(tiny_unet) -> None:
    model = create_lookback_unet(tiny_unet, preset("light-decoder"))
    assert list(model.config.sites) == ["middle"] + [f"output.{k}" for k in range(12)]
    assert len(model._handles) == 13


def test_unknown_site_is_refused(tiny_unet) -> None:
    with pytest.raises(
        ValueError, match=r"site 'input.3' does not exist in this UNet \(its sites: input.1, "
    ):
        create_lookback_unet(tiny_unet, LookBackConfig(sites=("input.3",)))


def test_per_site_gradient_checkpointing_gives_same_gradients(tiny_unet) -> None:
    x, t, ctx = _inputs(b=1, f=3)
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal)
    model.unet.requires_grad_(False)
    model(x, t, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in model.temporal.parameters()]
    model.temporal.zero_grad()
    model.checkpoint_sites = set(model.config.sites)
    model(x, t, ctx).square().mean().backward()
    for a, b in zip(plain, (p.grad for p in model.temporal.parameters()), strict=True):
        torch.testing.assert_close(a, b)
