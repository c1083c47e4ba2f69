"""Colour matching to the first frame: a sampling-time correction of global colour drift.

Each generated frame's latent, channel by channel, is shifted and scaled so its mean and
standard deviation over the image equal those of the first pinned frame (the given image, or a
long video's chunk context). What the frame shows, where things are and how they move, stays;
what it cannot keep is a frame-wide change of colour or contrast, which is exactly the drift
image-to-video models accumulate along the frames. It also pulls back a change of colour that
belongs to the video (a fade, a light switched on, a pan onto new ground), so it is a setting
(``colour_match`` of :class:`~lookback_core.sampler.SamplerSettings`), on where the weights
recommend it: for scenes whose colours stay put, as in the toy world.
"""

from __future__ import annotations

import torch

# 1e-6 of a unit-variance latent: a flat channel is shifted, never divided by zero
_MIN_STD = 1e-6


def match_colour(frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``frames`` (``[..., h, w]``, e.g. ``[b, c, f, h, w]``) with every ``h x w`` plane's mean and
    standard deviation set to those of the matching plane of ``reference`` (broadcast against
    ``frames``: ``[b, c, 1, h, w]`` for one reference frame per channel)."""
    dims = (-2, -1)
    mean, std = frames.mean(dims, keepdim=True), frames.std(dims, keepdim=True)
    target_mean, target_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return (frames - mean) / std.clamp_min(_MIN_STD) * target_std + target_mean
