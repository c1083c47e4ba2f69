"""Hybrid-initialised DDIM: frame 0 pinned, CFG batching, determinism, progress and cancel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize
from diffusers import DDIMScheduler
from einops import rearrange

from lookback_core.config import preset
from lookback_core.sampler import SamplerSettings, SamplingCancelled, initial_noise, sample_video
from lookback_core.temporal_unet import create_lookback_unet

SCHEDULER_CONFIG = json.loads(
    (Path(__file__).parents[1] / "lookback_core/configs/sd15/scheduler/scheduler_config.json").read_text()
)


@pytest.fixture
def model(tiny_unet):
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal, scale=0.02)
    return model


def _inputs(b: int = 1):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(b, 4, 8, 8, generator=g),
        torch.randn(b, 5, 32, generator=g),
        torch.randn(b, 5, 32, generator=g),
    )


class Spy:
    """Wraps the model and records every call's input."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def __call__(self, x, t, ctx):
        self.calls.append((x.clone(), t, ctx.shape))
        return self.model(x, t, ctx)


def test_frame_zero_is_pinned_at_every_step_and_in_the_result(model) -> None:
    z0, pos, neg = _inputs()
    spy = Spy(model)
    out = sample_video(spy, z0, pos, neg, 5, SamplerSettings(steps=4, cfg_scale=3.0), SCHEDULER_CONFIG)
    assert out.shape == (1, 4, 5, 8, 8)
    assert torch.equal(out[:, :, 0], z0)
    assert len(spy.calls) == 4
    for x, _, _ in spy.calls:
        assert torch.equal(x[:1, :, 0], z0) and torch.equal(x[1:, :, 0], z0)
    assert not torch.allclose(out[:, :, 1], z0, atol=0.1)


def test_add_noise_strategy_shows_frame_zero_noised_to_each_step(model) -> None:
    z0, pos, neg = _inputs()
    spy = Spy(model)
    settings = SamplerSettings(steps=4, cfg_scale=1.0, seed=5, first_frame="noised")
    out = sample_video(spy, z0, pos, None, 5, settings, SCHEDULER_CONFIG)
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    # drawn once: frame 0's share of KSampler's draw for all 5 frames from seed + 1 (what its ddim
    # re-noises a masked-off frame with)
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(5 + 1))[:1]
    noise = rearrange(noise, "f c h w -> 1 c f h w")
    for x, t, _ in spy.calls:
        torch.testing.assert_close(x[:, :, :1], scheduler.add_noise(z0[:, :, None], noise, t))
    assert [int(t) for _, t, _ in spy.calls] == [751, 501, 251, 1]
    assert torch.equal(out[:, :, 0], z0)  # the result still starts with the image
    clean = sample_video(
        model, z0, pos, None, 5, SamplerSettings(steps=4, cfg_scale=1.0, seed=5), SCHEDULER_CONFIG
    )
    assert not torch.allclose(out[:, :, 1:], clean[:, :, 1:])


def test_cfg_doubles_the_batch_never_the_frames(model) -> None:
    z0, pos, neg = _inputs(b=2)
    spy = Spy(model)
    sample_video(spy, z0, pos, neg, 3, SamplerSettings(steps=2, cfg_scale=5.0), SCHEDULER_CONFIG)
    assert spy.calls[0][0].shape == (4, 4, 3, 8, 8)
    spy.calls.clear()
    sample_video(spy, z0, pos, None, 3, SamplerSettings(steps=2), SCHEDULER_CONFIG)
    assert spy.calls[0][0].shape == (2, 4, 3, 8, 8)


def test_cfg_combines_predictions_with_the_scale(model) -> None:
    z0, pos, neg = _inputs()
    a = sample_video(model, z0, pos, neg, 3, SamplerSettings(steps=2, cfg_scale=1.0), SCHEDULER_CONFIG)
    b = sample_video(model, z0, pos, None, 3, SamplerSettings(steps=2), SCHEDULER_CONFIG)
    c = sample_video(model, z0, pos, neg, 3, SamplerSettings(steps=2, cfg_scale=4.0), SCHEDULER_CONFIG)
    torch.testing.assert_close(a, b)  # scale 1 is the positive prediction alone
    assert not torch.allclose(b, c)


def test_same_seed_same_video_other_seed_other_video(model) -> None:
    z0, pos, neg = _inputs()
    for eta in (0.0, 1.0):
        run = lambda seed, eta=eta: sample_video(  # noqa: E731
            model, z0, pos, neg, 4, SamplerSettings(steps=3, eta=eta, seed=seed), SCHEDULER_CONFIG
        )
        assert torch.equal(run(7), run(7))
        assert not torch.allclose(run(7), run(8))
    eta0 = sample_video(model, z0, pos, neg, 4, SamplerSettings(steps=3, seed=7), SCHEDULER_CONFIG)
    eta1 = sample_video(model, z0, pos, neg, 4, SamplerSettings(steps=3, eta=1.0, seed=7), SCHEDULER_CONFIG)
    assert not torch.allclose(eta0, eta1)


def test_colour_match_sets_each_new_frames_statistics_to_the_first_frames(model) -> None:
    z0, pos, neg = _inputs()
    pinned = torch.stack([z0, z0 * 2 + 1], dim=2)  # two pinned frames: the first one is the reference
    run = lambda match: sample_video(  # noqa: E731
        model,
        pinned,
        pos,
        neg,
        5,
        SamplerSettings(steps=3, cfg_scale=3.0, colour_match=match),
        SCHEDULER_CONFIG,
    )
    plain, matched = run("off"), run("first_frame")
    assert torch.equal(matched[:, :, :2], pinned)  # the pinned frames untouched
    stats = lambda x: (x.mean(dim=(-2, -1)), x.std(dim=(-2, -1)))  # noqa: E731
    for got, want in zip(stats(matched[:, :, 2:]), stats(z0[:, :, None])):
        torch.testing.assert_close(got, want.expand_as(got), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stats(plain[:, :, 2:])[0], stats(z0[:, :, None])[0].expand(1, 4, 3), atol=1e-2)
    # the same frames otherwise: per plane, an affine map of the plain result (correlation 1)
    a, b = plain[:, :, 2:].flatten(-2), matched[:, :, 2:].flatten(-2)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    torch.testing.assert_close((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)), torch.ones(1, 4, 3))
    with pytest.raises(ValueError, match="colour_match='yes' must be 'off' or 'first_frame'"):
        SamplerSettings(colour_match="yes")


def start_scale(steps: int) -> torch.Tensor:
    """KSampler's first sigma_T (ddim_uniform) in DDIM's space: sigma_T / sqrt(sigma_T^2 + 1),
    which is sqrt(1 - alphas_cumprod[T])."""
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    alpha = scheduler.alphas_cumprod[scheduler.timesteps[0]]
    sigma = ((1 - alpha) / alpha).sqrt()
    return sigma / (sigma**2 + 1).sqrt()


def ksampler_start(frames: int, seed: int, steps: int, pinned: int = 1) -> torch.Tensor:
    """The new frames' start as KSampler (ddim/ddim_uniform) has it, in DDIM's space: its noise for
    the whole latent (``prepare_noise``: frames as the batch, ``torch.manual_seed(seed)``) with the
    pinned frames' share dropped, scaled to the first step."""
    noise = torch.randn(frames, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(seed))
    return rearrange(noise[pinned:], "f c h w -> 1 c f h w") * start_scale(steps)


def test_the_noise_is_ksamplers_draw_for_the_whole_latent_scaled_to_the_first_step(model) -> None:
    z0, pos, neg = _inputs()
    settings = SamplerSettings(steps=4, cfg_scale=3.0, seed=9)
    for pinned in (1, 2):
        spy = Spy(model)
        sample_video(spy, torch.stack([z0, z0 + 1][:pinned], dim=2), pos, neg, 5, settings, SCHEDULER_CONFIG)
        first = spy.calls[0][0]  # [negative, positive], all frames
        want = ksampler_start(5, 9, 4, pinned)
        torch.testing.assert_close(first[1:, :, pinned:], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(first[:1, :, pinned:], want, rtol=1e-6, atol=1e-6)
    # a batch of b videos draws [b, f, c, h, w]: video 0 is a lone video's draw
    z0, pos, neg = _inputs(b=2)
    spy = Spy(model)
    sample_video(spy, z0, pos, neg, 5, settings, SCHEDULER_CONFIG)
    first = spy.calls[0][0][2:]  # the positive half
    drawn = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(first[:1, :, 1:], ksampler_start(5, 9, 4), rtol=1e-6, atol=1e-6)
    want = rearrange(drawn[:, 1:], "b f c h w -> b c f h w") * start_scale(4)
    torch.testing.assert_close(first[:, :, 1:], want, rtol=1e-6, atol=1e-6)
    # 500 steps start at the last timestep, sigma_max, where KSampler scales the noise to
    # sqrt(sigma^2 + 1): x_T is the noise itself
    spy = Spy(model)
    with pytest.raises(SamplingCancelled):
        sample_video(spy, z0[:1], pos[:1], None, 3, SamplerSettings(steps=500, seed=9), SCHEDULER_CONFIG,
                     should_cancel=lambda: len(spy.calls) == 1)  # fmt: skip
    assert int(spy.calls[0][1]) == 999
    torch.testing.assert_close(spy.calls[0][0][:, :, 1:], ksampler_start(3, 9, 4) / start_scale(4))


def test_noise_given_is_the_whole_latents_and_the_default_is_the_seeds(model) -> None:
    z0, pos, neg = _inputs()
    settings = SamplerSettings(steps=3, cfg_scale=3.0, seed=4)
    drawn = initial_noise((1, 4, 5, 8, 8), 4, z0.device, z0.dtype)
    ksampler = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(drawn, rearrange(ksampler, "f c h w -> 1 c f h w"), rtol=0, atol=0)
    default = sample_video(model, z0, pos, neg, 5, settings, SCHEDULER_CONFIG)
    given = sample_video(model, z0, pos, neg, 5, settings, SCHEDULER_CONFIG, noise=drawn)
    assert torch.equal(default, given)
    # the pinned frame's share is not used
    other = drawn.clone()
    other[:, :, 0] = 100.0
    assert torch.equal(default, sample_video(model, z0, pos, neg, 5, settings, SCHEDULER_CONFIG, noise=other))
    with pytest.raises(ValueError, match=r"noise must be \[1, 4, 5, 8, 8\] \(all frames"):
        sample_video(model, z0, pos, neg, 5, settings, SCHEDULER_CONFIG, noise=drawn[:, :, 1:])


def test_eta_and_the_add_noise_strategy_together(model) -> None:
    z0, pos, neg = _inputs()
    settings = lambda seed: SamplerSettings(steps=3, eta=0.5, seed=seed, first_frame="noised")  # noqa: E731
    run = lambda seed: sample_video(model, z0, pos, neg, 4, settings(seed), SCHEDULER_CONFIG)  # noqa: E731
    out = run(3)
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 0], z0)
    assert torch.equal(out, run(3)) and not torch.allclose(out, run(4))


def test_matches_diffusers_ddim_loop_when_modules_are_identity(tiny_unet) -> None:
    # With fresh (identity) modules frames are independent, so frames 1.. must be exactly what a
    # plain diffusers DDIM loop on the base UNet gives for the same noise: KSampler's draw for the
    # whole latent, scaled to the first step, and the last step to alpha 1 (ComfyUI's sigma 0).
    model = create_lookback_unet(tiny_unet, preset("light"))
    z0, pos, _ = _inputs()
    out = sample_video(model, z0, pos, None, 3, SamplerSettings(steps=5, seed=11), SCHEDULER_CONFIG)
    assert SCHEDULER_CONFIG["set_alpha_to_one"] is False  # the SD1.5 file's; the sampler ends at 1 anyway
    scheduler = DDIMScheduler.from_config({**SCHEDULER_CONFIG, "set_alpha_to_one": True})
    scheduler.set_timesteps(5)
    x = ksampler_start(3, 11, 5)[:, :, 1]
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = model.detach()(x, t, pos).sample
        x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(out[:, :, 2], x, rtol=1e-4, atol=1e-5)


def test_progress_is_reported_every_step(model) -> None:
    z0, pos, neg = _inputs()
    seen = []
    sample_video(
        model,
        z0,
        pos,
        neg,
        3,
        SamplerSettings(steps=3),
        SCHEDULER_CONFIG,
        on_step=lambda i, n, x: seen.append((i, n, tuple(x.shape))),
    )
    assert seen == [(1, 3, (1, 4, 3, 8, 8)), (2, 3, (1, 4, 3, 8, 8)), (3, 3, (1, 4, 3, 8, 8))]


def test_cancel_is_honoured_between_steps(model) -> None:
    z0, pos, neg = _inputs()
    spy = Spy(model)
    with pytest.raises(SamplingCancelled, match="before step 3 of 5"):
        sample_video(
            spy,
            z0,
            pos,
            neg,
            3,
            SamplerSettings(steps=5),
            SCHEDULER_CONFIG,
            should_cancel=lambda: len(spy.calls) == 2,
        )
    assert len(spy.calls) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 1}, "num_frames must be >= 2"),
        ({"negative": torch.zeros(1, 4, 32)}, "prompt embeddings"),
    ],
)
def test_bad_arguments_are_named(model, kwargs, message) -> None:
    z0, pos, neg = _inputs()
    args = {"negative": neg, "num_frames": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_video(
            model, z0, pos, args["negative"], args["num_frames"], SamplerSettings(steps=2), SCHEDULER_CONFIG
        )
    with pytest.raises(ValueError, match=r"steps=0 must be a whole number in 1\.\.1000"):
        SamplerSettings(steps=0)
    for field, value in (
        ("eta", 1.5),
        ("eta", float("nan")),
        ("cfg_scale", float("inf")),
        ("cfg_scale", -1.0),
    ):
        with pytest.raises(ValueError, match=f"{field}="):
            SamplerSettings(**{field: value})


def test_colour_match_on_a_one_pixel_latent_and_a_flat_first_frame() -> None:
    from lookback_core.colour_match import match_colour

    g = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 4, 3, 1, 1, generator=g)
    matched = match_colour(frames, frames[:, :, :1])
    assert torch.isfinite(matched).all()  # a 1x1 plane has no spread (was NaN): its mean is set
    assert torch.allclose(matched, frames[:, :, :1].expand_as(frames))
    # a flat first frame gives the level, not a flat video: each frame keeps its own spread
    frames = torch.randn(1, 4, 3, 8, 8, generator=g)
    flat = torch.full((1, 4, 1, 8, 8), 0.25)
    matched = match_colour(frames, flat)
    assert torch.allclose(matched.mean((-2, -1)), torch.full((1, 4, 3), 0.25), atol=1e-5)
    assert torch.allclose(matched.std((-2, -1)), frames.std((-2, -1)), rtol=1e-4)
    # a flat frame against a textured first frame stays flat, at the first frame's level
    reference = torch.randn(1, 4, 1, 8, 8, generator=g)
    matched = match_colour(torch.full((1, 4, 2, 8, 8), 3.0), reference)
    assert torch.allclose(matched, reference.mean((-2, -1), keepdim=True).expand(1, 4, 2, 8, 8), atol=1e-5)
