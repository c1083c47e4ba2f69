"""The training objective of the paper, with hybrid image-noise initialisation.

Frame 0 of every clip is the clean latent of its first frame; frames ``1..L-1`` are noised by the
DDPM forward process at one timestep per clip; the UNet with look-back modules predicts the
noise (or v), and the MSE is taken over frames ``1..L-1`` only. ``objective="ddpm"`` is the plain
DDPM objective instead (every frame noised and in the loss), the counterpart of the paper's
"add noise" sampling strategy. With a motion weight (beyond the paper) the MSE is a weighted
mean that counts more where a frame differs from frame 0 (:func:`motion_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lookback_core.temporal_unet import LookBackUNet

OBJECTIVES = ("hybrid", "ddpm")  # the paper's, and the plain DDPM one of its add-noise ablation
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def timestep_weights(
    num_timesteps: int,
    strategy: str = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    begin: int = 0,
    end: int | None = None,
) -> torch.Tensor | None:
    """Relative weights of drawing each training timestep, as the diffusers training scripts'
    ``--timestep_bias_*`` flags define them: ``strategy`` "later" multiplies the weight of the last
    ``portion`` of the timesteps (the noisiest) by ``multiplier``, "earlier" the first ``portion``
    (the least noisy), "range" the timesteps ``begin..end-1``; "none" (or a multiplier of 1) gives
    ``None``: uniform, drawn as an unbiased run always drew them."""
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(
            f"timestep bias strategy must be one of {TIMESTEP_BIAS_STRATEGIES}, got {strategy!r}"
        )
    if strategy == "none" or multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps)
    count = max(1, round(num_timesteps * portion))
    chosen = {
        "later": slice(num_timesteps - count, num_timesteps),
        "earlier": slice(0, count),
        "range": slice(begin, num_timesteps if end is None else end),
    }[strategy]
    weights[chosen] *= multiplier
    if not (torch.isfinite(weights).all() and weights.sum() > 0):  # float32: 1e39 overflows, 1e-50 is 0
        raise ValueError(
            f"timestep bias multiplier {multiplier:g} (portion {portion:g}) gives float32 draw weights that "
            "are infinite or all zero; use a multiplier in 1e-6..1e6"
        )
    return weights


def hybrid_noisy_latents(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler
) -> torch.Tensor:
    """``latents`` ``[b, c, f, h, w]`` noised at ``timesteps`` ``[b]``, frame 0 left clean."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return torch.cat([latents[:, :, :1], noisy[:, :, 1:]], dim=2)


def motion_weights(latents: torch.Tensor, strength: float) -> torch.Tensor:
    """Loss weights ``[b, 1, f, h, w]`` of ``latents`` ``[b, c, f, h, w]``: ``1 + strength * m``, where
    ``m`` is how much each latent pixel of a frame differs from frame 0 (mean over channels),
    relative to the clip's mean difference over frames 1.. (so the weights do not depend on the
    latents' scale). Where things move (an object where it is now and where it was) the loss
    counts more; a still clip weighs 1 everywhere."""
    change = (latents - latents[:, :, :1]).abs().mean(dim=1, keepdim=True)
    mean_change = change[:, :, 1:].mean(dim=(2, 3, 4), keepdim=True).clamp_min(1e-8)
    return 1 + strength * change / mean_change


def lookback_loss(
    model: LookBackUNet,
    latents: torch.Tensor,
    text: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    input_dtype: torch.dtype | None = None,
    objective: str = "hybrid",
    timestep_weights: torch.Tensor | None = None,
    motion_weight: float = 0.0,
) -> torch.Tensor:
    """MSE between the prediction and the target on frames 1..L-1 of ``latents`` ``[b, c, f, h, w]``.

    Noise, noising and target are computed in fp32 whatever the training precision (in bf16,
    ``sqrt(1 - alpha_bar_t)`` rounds to 0 for the smallest ``t``: no noise would be added while
    the target is pure noise); only the model's input is cast, to ``input_dtype`` (default
    ``text``'s dtype). Timesteps are drawn uniformly, or with ``timestep_weights`` (one per
    training timestep, see :func:`timestep_weights`). ``motion_weight`` > 0 weighs the MSE by
    :func:`motion_weights` of that strength (0: the plain MSE)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    latents = latents.float()
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    if timestep_weights is None:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=latents.device
        )
    else:
        timesteps = torch.multinomial(
            timestep_weights.to(latents.device), b, replacement=True, generator=generator
        )
    if objective == "hybrid":
        noisy = hybrid_noisy_latents(latents, noise, timesteps, scheduler)
    else:
        noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy.to(input_dtype or text.dtype), timesteps, text)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    first = 1 if objective == "hybrid" else 0
    prediction, target = prediction[:, :, first:].float(), target[:, :, first:]
    if motion_weight == 0:
        return F.mse_loss(prediction, target)
    weights = motion_weights(latents, motion_weight)[:, :, first:].expand_as(target)
    return ((prediction - target) ** 2 * weights).sum() / weights.sum()
