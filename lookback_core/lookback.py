"""The look-back module that follows every UNet layer (see ``config.py`` for the symbols).

On hidden states ``x`` of shape ``[(b f), n, h, w]``, with ``f`` given by the caller:

1. look-back conv, the paper's Algorithm 1, a recurrence over frames ``i = 0..f-1``::

       out[i] = in[i] + Conv2d_{d*n -> n, k x k}(concat(out[i-d+1], ..., out[i-1], in[i]))

   channels oldest first; frames before 0 are zeros. ``out[i-1]`` is already updated, so one
   layer carries information from frame 0 to the last frame. With the first-frame anchor
   (``first_frame_anchor``, beyond the paper), every frame ``i >= 1`` also gets
   ``Conv2d_{n -> n, k x k}(in[0])``: one hop from the given image, not ``i``.
2. channel mix: ``x + Conv2d_{n -> n, 1 x 1}(x)`` on every frame.
3. adapter: ``x + Conv3d_{depth-wise, a x a x a}(x)`` over ``(f, h, w)``;
4. temporal attention, off in every preset (the ablation's alternative to steps 1-3:
   :mod:`lookback_core.temporal_attention`).

The last (here: only) conv of each residual branch starts at zero, so a new module is the
identity. :func:`lookback_reference` follows step 1 literally and is what every faster form of
the recurrence is tested against. The look-back conv's weight is kept as ``d`` contiguous
blocks of ``n -> n`` (:class:`LookBackConv`), the form :func:`lookback_recurrence` computes with;
state dicts and weight files hold it in ``nn.Conv2d``'s layout ``[n, d*n, k, k]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import LookBackConfig
from .temporal_attention import TemporalAttention


class LookBackConv(nn.Module):
    """Step 1's ``d*n -> n``, ``k x k`` conv, its weight stored as ``d`` blocks ``[d, n, n, k, k]``.

    ``weight[j]`` reads window slot ``j`` (oldest first, so ``weight[d-1]`` reads ``in[i]``).
    Block-major storage keeps every block contiguous, so neither inference nor training ever
    copies a weight slice (``benchmarks/bench_recurrence.py``: slices cost 25-50% of the
    recurrence's time, and under autograd each copy would be kept until backward).
    ``state_dict`` and ``load_state_dict`` use ``nn.Conv2d``'s layout ``[n, d*n, k, k]``.
    """

    def __init__(self, channels: int, depth: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(depth, channels, channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_state_dict_post_hook(_blocks_to_conv_layout)
        self.register_load_state_dict_pre_hook(_conv_layout_to_blocks)

    def conv_weight(self) -> torch.Tensor:
        """The weight in ``nn.Conv2d``'s layout ``[n, d*n, k, k]``, as Algorithm 1 writes it."""
        return to_conv_layout(self.weight)


def to_conv_layout(blocks: torch.Tensor) -> torch.Tensor:
    """``[d, n, n, k, k]`` blocks as one ``nn.Conv2d`` weight ``[n, d*n, k, k]`` (a view)."""
    return rearrange(blocks, "d o i kh kw -> o (d i) kh kw")


def to_blocks(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """``nn.Conv2d``'s ``[n, d*n, k, k]`` as ``d`` blocks ``[d, n, n, k, k]`` (a view)."""
    return rearrange(weight, "o (d i) kh kw -> d o i kh kw", d=depth)


def _blocks_to_conv_layout(module: LookBackConv, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + "weight"] = to_conv_layout(state_dict[prefix + "weight"]).contiguous()


def _conv_layout_to_blocks(module: LookBackConv, state_dict: dict, prefix: str, *_: object) -> None:
    weight = state_dict.get(prefix + "weight")
    depth = module.weight.shape[0]
    # Anything else is left as it is, for load_state_dict to report as a shape mismatch.
    if weight is not None and weight.dim() == 4 and weight.shape[1] % depth == 0:
        state_dict[prefix + "weight"] = to_blocks(weight, depth)


class LookBackModule(nn.Module):
    """Look-back conv, channel mix and adapter for one site with ``channels`` = n."""

    def __init__(self, channels: int, config: LookBackConfig) -> None:
        super().__init__()
        self.channels = channels
        self.depth = config.depth
        self.padding_mode = config.padding_mode
        self.lookback = LookBackConv(channels, config.depth, config.kernel) if config.lookback else None
        k = config.kernel
        self.anchor = nn.Conv2d(channels, channels, k, padding=k // 2) if config.first_frame_anchor else None
        self.mix = nn.Conv2d(channels, channels, 1) if config.channel_mix else None
        a = config.adapter_kernel
        # "same" padding in space; in time centred (the conv's own padding) or, causal, a - 1 past
        # frames only (padded before the conv)
        self.adapter_past = a - 1 if config.causal_adapter else 0
        padding = (0 if config.causal_adapter else a // 2, a // 2, a // 2)
        self.adapter = (
            nn.Conv3d(channels, channels, a, padding=padding, groups=channels) if config.adapter else None
        )
        for conv in (self.anchor, self.mix, self.adapter):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.attention = TemporalAttention(channels, config) if config.temporal_attention != "off" else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames = _split_frames(x, num_frames)
        if self.lookback is not None:
            frames = lookback_recurrence(
                frames, self.lookback.weight, self.lookback.bias, self.padding_mode, self._anchor_term(frames)
            )
        return self._after_lookback(frames)

    def forward_reference(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Same as :meth:`forward` with step 1 computed by the literal per-frame loop."""
        frames = _split_frames(x, num_frames)
        if self.lookback is not None:
            frames = lookback_reference(
                frames,
                self.lookback.conv_weight(),
                self.lookback.bias,
                self.padding_mode,
                self._anchor_term(frames),
            )
        return self._after_lookback(frames)

    def _anchor_term(self, frames: torch.Tensor) -> torch.Tensor | None:
        """The first-frame anchor's ``Conv2d(in[0])`` ``[b, n, h, w]``, or None without one."""
        if self.anchor is None:
            return None
        return _conv(frames[:, 0], self.anchor.weight, self.anchor.bias, self.padding_mode)

    def _after_lookback(self, frames: torch.Tensor) -> torch.Tensor:
        b, f = frames.shape[:2]
        x = rearrange(frames, "b f n h w -> (b f) n h w")
        if self.mix is not None:
            x = x + self.mix(x)
        if self.adapter is not None:
            v = rearrange(x, "(b f) n h w -> b n f h w", b=b)
            past = F.pad(v, (0, 0, 0, 0, self.adapter_past, 0)) if self.adapter_past else v
            v = v + self.adapter(past)
            x = rearrange(v, "b n f h w -> (b f) n h w")
        if self.attention is not None:
            x = self.attention(x, f)
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


def lookback_reference(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding_mode: str = "zeros",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Algorithm 1 written literally: one concat and one conv per frame.

    ``frames``: [b, f, n, h, w]; ``weight``: ``nn.Conv2d``'s layout ``[n, d*n, k, k]``;
    ``anchor``: the first-frame anchor's term ``[b, n, h, w]``, added to every frame after 0.
    """
    b, f, n, h, w = frames.shape
    depth = weight.shape[1] // n
    zeros = frames.new_zeros(b, n, h, w)
    outs: list[torch.Tensor] = []
    for i in range(f):
        window = [outs[j] if j >= 0 else zeros for j in range(i - depth + 1, i)] + [frames[:, i]]
        out = frames[:, i] + _conv(torch.cat(window, dim=1), weight, bias, padding_mode)
        outs.append(out + anchor if anchor is not None and i >= 1 else out)
    return torch.stack(outs, dim=1)


def lookback_recurrence(
    frames: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    padding_mode: str = "zeros",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Algorithm 1 computed faster; equal to :func:`lookback_reference`.

    ``frames``: [b, f, n, h, w]; ``blocks``: the weight as :class:`LookBackConv` keeps it,
    ``[d, n, n, k, k]``. The conv is linear in its input channels, so it is the sum of one
    ``n -> n`` conv per window slot. The ``in[i]`` term (``blocks[-1]``) has no dependency
    between frames and runs for all frames in one batched conv; the loop then adds one conv per
    earlier output that exists, so the zero frames before frame 0 cost nothing and no window is
    ever concatenated (autograd keeps the earlier outputs themselves, not copies of them). All
    samples of the batch (CFG halves included) share each conv. ``anchor`` (the first-frame
    anchor's term ``[b, n, h, w]``) is added to every frame after 0.
    ``benchmarks/bench_recurrence.py`` measures this against the alternatives.
    """
    b, f, n, h, w = frames.shape
    depth = blocks.shape[0]
    # Frame-major, so that every frame of every intermediate is one contiguous block.
    x = rearrange(frames, "b f n h w -> (f b) n h w").contiguous()
    # One unbind, not blocks[j] per use: under autograd each indexing would write its gradient
    # into a zero tensor of the whole weight (819 MB per conv at the paper preset's deep sites).
    parts = blocks.unbind(0)
    current = (_conv(x, parts[-1], bias, padding_mode) + x).view(f, b, n, h, w)
    outs: list[torch.Tensor] = []
    for i in range(f):
        out = current[i] if anchor is None or i == 0 else current[i] + anchor
        for j in range(depth - 1):
            source = i - (depth - 1) + j
            if source >= 0:
                out = out + _conv(outs[source], parts[j], None, padding_mode)
        outs.append(out)
    return torch.stack(outs, dim=1)
