"""The look-back module that follows every UNet layer (see ``config.py`` for the symbols).

On hidden states ``x`` of shape ``[(b f), n, h, w]``, with ``f`` given by the caller:

1. look-back conv, the paper's Algorithm 1, a recurrence over frames ``i = 0..f-1``::

       out[i] = in[i] + Conv2d_{d*n -> n, k x k}(concat(out[i-d+1], ..., out[i-1], in[i]))

   channels oldest first; frames before 0 are zeros. ``out[i-1]`` is already updated, so one
   layer carries information from frame 0 to the last frame.
2. channel mix: ``x + Conv2d_{n -> n, 1 x 1}(x)`` on every frame.
3. adapter: ``x + Conv3d_{depth-wise, a x a x a}(x)`` over ``(f, h, w)``.

The last (here: only) conv of each residual branch starts at zero, so a new module is the
identity. :func:`lookback_reference` follows step 1 literally and is what every faster form of
the recurrence is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import LookBackConfig


class LookBackModule(nn.Module):
    """Look-back conv, channel mix and adapter for one site with ``channels`` = n."""

    def __init__(self, channels: int, config: LookBackConfig) -> None:
        super().__init__()
        self.channels = channels
        self.depth = config.depth
        self.padding_mode = config.padding_mode
        k = config.kernel
        self.lookback = nn.Conv2d(
            config.depth * channels, channels, k, padding=k // 2, padding_mode=config.padding_mode
        )
        self.mix = nn.Conv2d(channels, channels, 1) if config.channel_mix else None
        a = config.adapter_kernel
        self.adapter = (
            nn.Conv3d(channels, channels, a, padding=a // 2, groups=channels) if config.adapter else None
        )
        for conv in (self.lookback, self.mix, self.adapter):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames = _split_frames(x, num_frames)
        frames = lookback_recurrence(frames, self.lookback.weight, self.lookback.bias, self.padding_mode)
        return self._mix_and_adapt(frames)

    def forward_reference(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Same as :meth:`forward` with step 1 computed by the literal per-frame loop."""
        frames = _split_frames(x, num_frames)
        frames = lookback_reference(frames, self.lookback, self.depth)
        return self._mix_and_adapt(frames)

    def _mix_and_adapt(self, frames: torch.Tensor) -> torch.Tensor:
        b = frames.shape[0]
        x = rearrange(frames, "b f n h w -> (b f) n h w")
        if self.mix is not None:
            x = x + self.mix(x)
        if self.adapter is not None:
            v = rearrange(x, "(b f) n h w -> b n f h w", b=b)
            v = v + self.adapter(v)
            x = rearrange(v, "b n f h w -> (b f) n h w")
        return x


def _split_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    if num_frames < 1 or x.shape[0] % num_frames:
        raise ValueError(f"hidden states with batch {x.shape[0]} cannot hold {num_frames} frames per sample")
    return rearrange(x, "(b f) n h w -> b f n h w", f=num_frames)


def _conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding_mode: str
) -> torch.Tensor:
    pad = weight.shape[-1] // 2
    if padding_mode == "zeros" or pad == 0:
        return F.conv2d(x, weight, bias, padding=pad)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=padding_mode), weight, bias)


def lookback_reference(frames: torch.Tensor, conv: nn.Conv2d, depth: int) -> torch.Tensor:
    """Algorithm 1 written literally: one concat and one conv per frame. ``frames``: [b, f, n, h, w]."""
    b, f, n, h, w = frames.shape
    zeros = frames.new_zeros(b, n, h, w)
    outs: list[torch.Tensor] = []
    for i in range(f):
        window = [outs[j] if j >= 0 else zeros for j in range(i - depth + 1, i)] + [frames[:, i]]
        outs.append(frames[:, i] + conv(torch.cat(window, dim=1)))
    return torch.stack(outs, dim=1)


def lookback_recurrence(
    frames: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Algorithm 1 computed faster; equal to :func:`lookback_reference`. ``frames``: [b, f, n, h, w].

    The conv is linear in its input channels, so its weight splits into ``d`` parts of
    ``n -> n`` channels, one per window slot: ``parts[-1]`` reads ``in[i]``, ``parts[j]`` reads
    ``out[i - d + 1 + j]``. The ``in[i]`` term has no dependency between frames and runs for all
    frames in one batched conv; the loop adds one conv per earlier output that exists, so the
    zero frames before frame 0 cost nothing and no window is ever concatenated (autograd keeps
    the earlier outputs themselves, not copies of them). All samples of the batch (CFG halves
    included) share each conv. Without autograd the parts are made contiguous once per call
    (a sliced weight is copied by every conv: 164 MB per conv at the paper preset's
    1280-channel sites); under autograd they stay views, because every conv keeps its weight
    for backward and contiguous copies would hold a second copy of all temporal weights until
    then. ``benchmarks/bench_recurrence.py`` measures this against the alternatives.
    """
    b, f, n, h, w = frames.shape
    depth = weight.shape[1] // n
    parts = [weight[:, j * n : (j + 1) * n] for j in range(depth)]
    if not (torch.is_grad_enabled() and (frames.requires_grad or weight.requires_grad)):
        parts = [part.contiguous() for part in parts]
    # Frame-major, so that every frame of every intermediate is one contiguous block.
    x = rearrange(frames, "b f n h w -> (f b) n h w").contiguous()
    current = (_conv(x, parts[-1], bias, padding_mode) + x).view(f, b, n, h, w)
    outs: list[torch.Tensor] = []
    for i in range(f):
        out = current[i]
        for j, part in enumerate(parts[:-1]):
            source = i - (depth - 1) + j
            if source >= 0:
                out = out + _conv(outs[source], part, None, padding_mode)
        outs.append(out)
    return torch.stack(outs, dim=1)
