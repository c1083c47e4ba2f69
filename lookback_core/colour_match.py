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

# 1e-6 of a unit-variance latent: a spread below it is none (a flat plane, or a 1x1 latent)
_MIN_STD = 1e-6


def match_colour(frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``frames`` (``[..., h, w]``, e.g. ``[b, c, f, h, w]``) with every ``h x w`` plane's mean and
    standard deviation set to those of the matching plane of ``reference`` (broadcast against
    ``frames``: ``[b, c, 1, h, w]`` for one reference frame per channel).

    Where either plane has no spread (flat, or a single pixel) only the mean is set: a flat
    reference has no contrast to give (scaling to it would flatten every frame), and a flat frame
    none to scale."""
    dims = (-2, -1)
    # the spread over the plane itself (correction 0): a 1x1 plane's is 0, not NaN; the ratio of two
    # planes' spreads is the same either way
    mean, std = frames.mean(dims, keepdim=True), frames.std(dims, keepdim=True, correction=0)
    target_mean = reference.mean(dims, keepdim=True)
    target_std = reference.std(dims, keepdim=True, correction=0)
    spread = (std > _MIN_STD) & (target_std > _MIN_STD)
    scale = torch.where(spread, target_std / std.clamp_min(_MIN_STD), torch.ones_like(std))
    return (frames - mean) * scale + target_mean
