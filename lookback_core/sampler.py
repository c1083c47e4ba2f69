"""Hybrid-initialised DDIM sampling.

``x = [z0, noise_1, ..., noise_{f-1}]``. Before every UNet call frame 0 is set to the clean
image latent ``z0``; the DDIM update (diffusers' :class:`~diffusers.DDIMScheduler`) moves
frames ``1..f-1`` only, and the returned frame 0 is ``z0`` exactly. The same holds for ``k``
pinned clean frames, which is how a long video's next chunk continues the previous one.

The noise convention is ComfyUI's, so that a seed gives the same video here and in KSampler
(ddim sampler, ddim_uniform scheduler, the same steps and cfg):

- the noise is drawn as KSampler draws it for the video's latent of all ``f`` frames (frames as
  the batch, ``comfy.sample.prepare_noise``): ``torch.randn([f, c, h, w])`` in float32 from a CPU
  generator seeded with the seed, then cast (a batch of ``b`` videos draws ``[b, f, c, h, w]``,
  so ``b = 1`` is KSampler's draw exactly). The share of the ``k`` pinned frames is drawn and
  not used, as in KSampler, whose noise mask keeps those frames;
- DDIM starts at ``x_T = sqrt(1 - alphas_cumprod[T]) * noise`` (``T`` the first timestep), which
  is KSampler's start ``x = sigma_T * noise`` in DDIM's variance-preserving space (KSampler scales
  the noise to ``sqrt(sigma^2 + 1)``, i.e. ``x_T = noise``, only when it starts at ``sigma_max``,
  the last timestep: so does this sampler);
- the last step goes to ``alpha = 1`` (``set_alpha_to_one``, whatever the scheduler config
  says), as ComfyUI's last step goes to ``sigma = 0``.

Then the steps are the same (DDIM with eta 0 is Euler in sigma space) and the frames agree within
float rounding (tests/test_comfyui_native.py). ddim_uniform takes timesteps ``1000 // steps``
apart from timestep 1 up, as DDIM's "leading" spacing does, so the two take the same timesteps
whenever ddim_uniform makes ``steps`` steps: at any divisor of 1000 (10, 20, 25, 50, ...); at some
other counts (16, 30, ...) it adds a step. A long video's chunk ``i`` uses the seed ``seed + i``
(:mod:`lookback_core.long_video`): a KSampler given that seed and Look-Back Extend Video's latent
(the pinned context, then the new frames) samples the same chunk.

``first_frame="noised"`` is the paper's "add noise" strategy instead (for models trained with
the plain DDPM objective on all frames, ``--objective ddpm``): before every UNet call the pinned
frames are ``z0`` noised to that step's timestep, with the pinned frames' share of a second draw
of the same kind from ``seed + 1`` (what KSampler's ddim re-noises a masked-off frame with); the
result's frame 0 is still ``z0``. ``eta > 0`` draws each step's noise from ``seed + 2``.

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
from .rules import COLOUR_MATCHES, SAMPLER_SETTINGS, Rule, shown  # noqa: F401 (COLOUR_MATCHES: re-exported)
from .temporal_unet import LookBackUNet

StepCallback = Callable[[int, int, torch.Tensor], None]


class SamplingCancelled(RuntimeError):
    """Raised between steps when the host asked to stop."""


# What each sampler setting must be, checked in one place for every front end and for the
# settings a weights file recommends: (test, what is expected), from the one table of settings.
SETTING_RULES: dict[str, Rule] = {name: setting.rule for name, setting in SAMPLER_SETTINGS.items()}


class InvalidSetting(ValueError):
    """A sampler setting out of range; ``name`` is the field, the message says what is expected."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"{name}={shown(value)} must be {expected}")
        self.name, self.value, self.expected = name, value, expected


def check_setting(name: str, value: Any) -> None:
    """Raise :class:`InvalidSetting` unless ``value`` is a valid ``name`` (a key of :data:`SETTING_RULES`)."""
    rule = SETTING_RULES[name]
    if not rule.accepts(value):
        raise InvalidSetting(name, value, rule.expected)


@dataclass(frozen=True)
class SamplerSettings:
    """What a DDIM run takes besides the model and its inputs."""

    steps: int = SAMPLER_SETTINGS["steps"].default
    cfg_scale: float = SAMPLER_SETTINGS["cfg_scale"].default
    eta: float = SAMPLER_SETTINGS["eta"].default
    seed: int = SAMPLER_SETTINGS["seed"].default
    first_frame: str = SAMPLER_SETTINGS["first_frame"].default
    colour_match: str = SAMPLER_SETTINGS["colour_match"].default  # lookback_core.colour_match

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
    """Unit Gaussian noise for latent videos of ``shape`` ``[b, c, f, h, w]``, drawn on the CPU
    from ``seed`` as KSampler draws it for one video's latent (frames as the batch):
    ``[b, f, c, h, w]`` in float32, then rearranged, moved and cast. The same video for the same
    seed on any device, and in ComfyUI."""
    b, c, f, h, w = shape
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32)
    return noise.transpose(1, 2).contiguous().to(device=device, dtype=dtype)


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
    step, and a true answer raises :class:`SamplingCancelled`. ``noise``: unit Gaussian noise for
    all ``f`` frames ``[b, c, f, h, w]``, of the kind :func:`initial_noise` draws (default: drawn
    from the seed); another front end's noise for the whole latent, to reproduce its video (e.g.
    KSampler's ``prepare_noise`` output ``[f, c, h, w]`` as ``[1, c, f, h, w]``). The pinned
    frames' share is not used; the sampler scales the rest to the first timestep (module
    docstring). Returns ``[b, c, f, h, w]``.
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
    # the last step goes to alpha 1, as ComfyUI's goes to sigma 0 (module docstring)
    scheduler = DDIMScheduler.from_config({**scheduler_config, "set_alpha_to_one": True})
    scheduler.set_timesteps(settings.steps, device=image_latent.device)
    shape = (b, c, num_frames, h, w)
    if noise is None:
        noise = initial_noise(shape, settings.seed, image_latent.device, image_latent.dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(
            f"noise must be {list(shape)} (all frames, the pinned ones' share unused), got shape {tuple(noise.shape)}"
        )
    generator = torch.Generator("cpu").manual_seed(offset_seed(settings.seed, 2))
    pinned = image_latent
    pinned_noise = None
    if settings.first_frame == "noised":
        renoise = initial_noise(shape, offset_seed(settings.seed, 1), pinned.device, pinned.dtype)
        pinned_noise = renoise[:, :, :k]
    # KSampler's start x = sigma * noise (sqrt(sigma^2 + 1) * noise at sigma_max), in DDIM's space
    first = int(scheduler.timesteps[0])
    at_max = first >= scheduler.config.num_train_timesteps - 1
    start_scale = 1.0 if at_max else math.sqrt(1 - float(scheduler.alphas_cumprod[first]))
    moving = noise[:, :, k:].to(image_latent) * start_scale
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
