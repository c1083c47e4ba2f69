"""Temporal attention at a site: the alternative the paper argues against, for the ablation.

An AnimateDiff-style motion module, built from diffusers' own class
(:class:`~diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D`: GroupNorm, a
projection, transformer blocks whose two self-attentions run along the frames of each pixel with
sinusoidal frame positions, a projection back, added to the input), with AnimateDiff's settings
(8 heads, one block, GEGLU). Its output projection starts at zero, so a new module is the
identity, as the look-back modules are. ``config.temporal_attention``:

- ``"full"``: every frame attends to every frame of the clip (AnimateDiff's);
- ``"causal"``: every frame attends to itself and the frames before it only, and the module's
  GroupNorm takes its statistics per frame (AnimateDiff's takes them over the whole clip, through
  which every frame would see the later ones): a semi-auto-regressive attention, the causality of
  the look-back without its convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from einops import rearrange
from torch import nn

from .config import LookBackConfig

MAX_ATTENTION_FRAMES = 64  # frame positions the motion module knows (AnimateDiff's: 32)
GROUPS = 32  # its GroupNorm's, as SD1.5's and ComfyUI's


class CausalTemporalAttnProcessor:
    """diffusers' attention processor interface: self-attention along the frames in which frame
    ``i`` sees frames ``0..i`` only (scaled dot-product attention with its causal mask)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("causal temporal attention is self-attention along the frames, without a mask")
        q, k, v = (
            rearrange(proj(hidden_states), "b f (h d) -> b h f d", h=attn.heads)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        out = rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b h f d -> b f (h d)")
        out = attn.to_out[1](attn.to_out[0](out))  # the projection and its dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of ``[b, c, f, h, w]`` with statistics per frame: the motion module's own norm takes
    them over all the frames, through which a frame would see later ones (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        flat = super().forward(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(flat, "(b f) c h w -> b c f h w", f=frames)


class TemporalAttention(nn.Module):
    """The motion module of one site with ``channels`` = n; ``forward`` takes ``[(b f), n, h, w]``."""

    def __init__(self, channels: int, config: LookBackConfig) -> None:
        super().__init__()
        heads = config.attention_heads
        if channels % heads or channels % GROUPS:
            raise ValueError(
                f"temporal attention needs a site's channels divisible by its {heads} heads and {GROUPS} "
                f"norm groups; this site has {channels}"
            )
        self.motion = AnimateDiffTransformer3D(
            num_attention_heads=heads,
            attention_head_dim=channels // heads,
            in_channels=channels,
            norm_num_groups=GROUPS,
            activation_fn="geglu",
            double_self_attention=True,
            positional_embeddings="sinusoidal",
            num_positional_embeddings=MAX_ATTENTION_FRAMES,
        )
        nn.init.zeros_(self.motion.proj_out.weight)
        nn.init.zeros_(self.motion.proj_out.bias)
        if config.temporal_attention == "causal":
            self.motion.norm = FrameGroupNorm(GROUPS, channels, eps=self.motion.norm.eps)
            for module in self.motion.modules():
                if isinstance(module, Attention):
                    module.set_processor(CausalTemporalAttnProcessor())

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames > MAX_ATTENTION_FRAMES:
            raise ValueError(
                f"temporal attention knows {MAX_ATTENTION_FRAMES} frame positions; {num_frames} frames were "
                "given at once (sample longer videos in chunks)"
            )
        return self.motion(x, num_frames=num_frames)
