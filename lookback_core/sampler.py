"""Hybrid-initialised DDIM sampling.

``x = [z0, noise_1, ..., noise_{f-1}]``. Before every UNet call frame 0 is set to the clean
image latent ``z0``; the DDIM update (diffusers' :class:`~diffusers.DDIMScheduler`) moves
frames ``1..f-1`` only, and the returned frame 0 is ``z0`` exactly. The same holds for ``k``
pinned clean frames, which is how a long video's next chunk continues the previous one.

``first_frame="noised"`` is the paper's "add noise" strategy instead (for models trained with
the plain DDPM objective on all frames, ``--objective ddpm``): before every UNet call the pinned
frames are ``z0`` noised to that step's timestep (with noise drawn once); the result's frame 0
is still ``z0``.

``colour_match="first_frame"`` sets each new frame's latent colour statistics to the first
pinned frame's at the end (:mod:`lookback_core.colour_match`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from .colour_match import match_colour
from .temporal_unet import LookBackUNet

StepCallback = Callable[[int, int, torch.Tensor], None]


class SamplingCancelled(RuntimeError):
    """Raised between steps when the host asked to stop."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# the colour_match settings: none, or each new frame's latent statistics set to the first pinned frame's
COLOUR_MATCHES = ("off", "first_frame")
# What each sampler setting must be, checked in one place for every front end and for the
# settings a weights file recommends: (test, what is expected).
SETTING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
        "an integer in 1..1000 (the schedule has 1000 timesteps)",
    ),
    "cfg_scale": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0 (1 disables guidance)"),
    "eta": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in 0..1 (0: DDIM, 1: DDPM-like)"),
    "seed": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64,
        "an integer in 0..2^64-1",
    ),
    "first_frame": (
        lambda v: v in ("clean", "noised"),
        "'clean' (hybrid initialisation) or 'noised' (the paper's add-noise strategy)",
    ),
    "colour_match": (
        lambda v: v in COLOUR_MATCHES,
        "'off' or 'first_frame' (each new frame's latent colour statistics set to the first pinned frame's)",
    ),
}


class InvalidSetting(ValueError):
    """A sampler setting out of range; ``name`` is the field, the message says what is expected."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"{name}={value!r} must be {expected}")
        self.name, self.value, self.expected = name, value, expected


def check_setting(name: str, value: Any) -> None:
    """Raise :class:`InvalidSetting` unless ``value`` is a valid ``name`` (a key of :data:`SETTING_RULES`)."""
    valid, expected = SETTING_RULES[name]
    if not valid(value):
        raise InvalidSetting(name, value, expected)


@dataclass(frozen=True)
class SamplerSettings:
    """What a DDIM run takes besides the model and its inputs."""

    steps: int = 25
    cfg_scale: float = 7.5
    eta: float = 0.0
    seed: int = 0
    first_frame: str = "clean"
    colour_match: str = "off"  # lookback_core.colour_match

    def __post_init__(self) -> None:
        for name in SETTING_RULES:
            check_setting(name, getattr(self, name))


def resolve_settings(
    given: dict[str, Any], recommended: dict[str, Any], seed: int
) -> tuple[SamplerSettings, list[str]]:
    """Settings the user ``given`` (None for unset), else the ``recommended`` ones, else the defaults.

    Returns the settings and the names of the fields taken from ``recommended``.
    """
    given = {k: v for k, v in given.items() if v is not None}
    from_recommended = [k for k in recommended if k not in given]
    return SamplerSettings(seed=seed, **{**recommended, **given}), from_recommended


def offset_seed(seed: int, offset: int) -> int:
    """The seed ``offset`` places after ``seed``, wrapping round 2^64 (seeds are 0..2^64-1), for the
    further generators a run derives from the one seed it is given."""
    return (seed + offset) % 2**64


def initial_noise(
    shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Noise drawn on the CPU from ``seed``: the same video for the same seed on any device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def sample_video(
    model: LookBackUNet,
    image_latent: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    num_frames: int,
    settings: SamplerSettings,
    scheduler_config: dict[str, Any],
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``num_frames`` latent frames that begin with the clean ``image_latent``.

    ``image_latent``: ``[b, c, h, w]`` (VAE mean times the scaling factor), or ``[b, c, k, h, w]``
    for ``k`` clean frames pinned at the start (the context of a long video's next chunk);
    ``positive`` and ``negative``: prompt embeddings ``[b, tokens, dim]`` (``negative`` may be
    ``None`` for no guidance). ``on_step(step, total, estimate)`` is called after every step
    with the current estimate of the clean video (for previews); ``should_cancel`` before every
    step, and a true answer raises :class:`SamplingCancelled`. ``noise``: the starting state of
    the new frames ``[b, c, f - k, h, w]`` (default: drawn from the seed; another front end's noise
    to reproduce its video). Returns ``[b, c, f, h, w]``.
    """
    if image_latent.ndim == 4:
        image_latent = image_latent.unsqueeze(2)
    if image_latent.ndim != 5:
        raise ValueError(
            f"image_latent must be [b, c, h, w] or [b, c, k, h, w], got shape {tuple(image_latent.shape)}"
        )
    b, c, k, h, w = image_latent.shape
    if num_frames <= k:
        raise ValueError(
            f"num_frames must be >= {k + 1} (the {k} pinned frame(s) and at least one new frame), got {num_frames}"
        )
    if positive.shape[0] != b or (negative is not None and negative.shape != positive.shape):
        raise ValueError(
            f"prompt embeddings must be [{b}, tokens, dim] like the image latent's batch; got "
            f"positive {tuple(positive.shape)} and negative "
            f"{None if negative is None else tuple(negative.shape)}"
        )
    guided = negative is not None and settings.cfg_scale != 1.0
    context = torch.cat([negative, positive]) if guided else positive
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(settings.steps, device=image_latent.device)
    shape = (b, c, num_frames - k, h, w)
    if noise is None:
        noise = initial_noise(shape, settings.seed, image_latent.device, image_latent.dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {list(shape)} (the new frames), got shape {tuple(noise.shape)}")
    generator = torch.Generator("cpu").manual_seed(offset_seed(settings.seed, 1))
    pinned = image_latent
    pinned_noise = None
    if settings.first_frame == "noised":
        pinned_noise = initial_noise(
            tuple(pinned.shape), offset_seed(settings.seed, 2), pinned.device, pinned.dtype
        )
    moving = noise * scheduler.init_noise_sigma
    total = len(scheduler.timesteps)
    for step, t in enumerate(scheduler.timesteps):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled(f"sampling cancelled before step {step + 1} of {total}")
        seen = pinned if pinned_noise is None else scheduler.add_noise(pinned, pinned_noise, t)
        x = torch.cat([seen, moving], dim=2)
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        with torch.no_grad():
            eps = model(x_in, t, context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + settings.cfg_scale * (eps_cond - eps_uncond)
        step_noise = None
        if settings.eta > 0:
            step_noise = torch.randn(moving.shape, generator=generator, dtype=torch.float32).to(moving)
        result = scheduler.step(eps[:, :, k:], t, moving, eta=settings.eta, variance_noise=step_noise)
        moving = result.prev_sample
        if on_step is not None:
            on_step(step + 1, total, torch.cat([pinned, result.pred_original_sample], dim=2))
    if settings.colour_match == "first_frame":
        moving = match_colour(moving, pinned[:, :, :1])
    return torch.cat([pinned, moving], dim=2)
