"""Hybrid-initialised DDIM: frame 0 pinned, CFG batching, determinism, progress and cancel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize
from diffusers import DDIMScheduler

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
    noise = initial_noise((1, 4, 1, 8, 8), 5 + 2, z0.device, z0.dtype)  # drawn once, from the seed
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


def test_matches_diffusers_ddim_loop_when_modules_are_identity(tiny_unet) -> None:
    # With fresh (identity) modules frames are independent, so frames 1.. must be exactly what a
    # plain diffusers DDIM loop on the base UNet gives for the same noise.
    model = create_lookback_unet(tiny_unet, preset("light"))
    z0, pos, _ = _inputs()
    out = sample_video(model, z0, pos, None, 3, SamplerSettings(steps=5, seed=11), SCHEDULER_CONFIG)
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    x = initial_noise((1, 4, 2, 8, 8), 11, z0.device, z0.dtype)[:, :, 1]
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
    with pytest.raises(ValueError, match=r"steps=0 must be an integer in 1\.\.1000"):
        SamplerSettings(steps=0)
    for field, value in (
        ("eta", 1.5),
        ("eta", float("nan")),
        ("cfg_scale", float("inf")),
        ("cfg_scale", -1.0),
    ):
        with pytest.raises(ValueError, match=f"{field}="):
            SamplerSettings(**{field: value})
