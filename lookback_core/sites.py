"""Where look-back modules sit in a diffusers ``UNet2DConditionModel``.

Sites are named in the original LDM layout so a name means the same in diffusers and in
ComfyUI's UNet:

- ``input.K``: output of LDM input block K. Input block 0 is ``conv_in``; then each diffusers
  down block ``i`` contributes its layers (resnet + attention) and, if present, its
  down-sampler, which takes an index of its own but carries no module.
- ``middle``: output of the middle block.
- ``output.K``: output of LDM output block K, i.e. up block ``i`` layer ``j``; the last layer of
  an up block includes the block's up-sampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Site:
    """One place in the UNet: the submodule whose output the look-back module transforms."""

    name: str
    module: nn.Module
    channels: int
    returns_tuple: bool  # diffusers attention blocks called with return_dict=False return (h,)


def _layer_module(block: nn.Module, j: int) -> tuple[nn.Module, bool]:
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) > j:
        return attentions[j], True
    return block.resnets[j], False


def find_sites(unet: nn.Module) -> dict[str, Site]:
    """Map every site name of ``unet`` to the module whose output it modifies."""
    sites: dict[str, Site] = {}
    k = 1  # input block 0 is conv_in
    for block in unet.down_blocks:
        channels = block.resnets[-1].out_channels
        for j in range(len(block.resnets)):
            module, is_tuple = _layer_module(block, j)
            sites[f"input.{k}"] = Site(f"input.{k}", module, channels, is_tuple)
            k += 1
        if getattr(block, "downsamplers", None):
            k += 1
    mid = unet.mid_block
    sites["middle"] = Site("middle", mid, mid.resnets[-1].out_channels, False)
    k = 0
    for block in unet.up_blocks:
        channels = block.resnets[-1].out_channels
        last = len(block.resnets) - 1
        for j in range(last + 1):
            if j == last and getattr(block, "upsamplers", None):
                module, is_tuple = block.upsamplers[-1], False
            else:
                module, is_tuple = _layer_module(block, j)
            sites[f"output.{k}"] = Site(f"output.{k}", module, channels, is_tuple)
            k += 1
    return sites


def site_channels(unet: nn.Module) -> dict[str, int]:
    """Channel count ``n`` of the hidden state at every site of ``unet``."""
    return {name: site.channels for name, site in find_sites(unet).items()}


def ldm_site_channels(
    model_channels: int, channel_mult: Sequence[int], num_res_blocks: int | Sequence[int]
) -> dict[str, int]:
    """Channel count at every site of an LDM-layout UNet described by its config (the keys of
    ComfyUI's ``unet_config``); equal to :func:`site_channels` of the same UNet in diffusers."""
    levels = len(channel_mult)
    blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
    sites: dict[str, int] = {}
    k = 1  # input block 0 is conv_in
    for level, mult in enumerate(channel_mult):
        for _ in range(blocks[level]):
            sites[f"input.{k}"] = model_channels * mult
            k += 1
        k += level < levels - 1  # the down-sampler's block carries no module
    sites["middle"] = model_channels * channel_mult[-1]
    k = 0
    for level in reversed(range(levels)):
        for _ in range(blocks[level] + 1):
            sites[f"output.{k}"] = model_channels * channel_mult[level]
            k += 1
    return sites


def site_problems(
    wanted: Mapping[str, int | None], channels: Mapping[str, int], source: str = "the modules"
) -> list[str]:
    """Why look-back modules for the sites of ``wanted`` (site -> channels, or None: any) do not fit a
    UNet whose sites have ``channels``; empty when they fit. The one check of sites and channels,
    for configs, modules and weights files alike; ``source`` names where ``wanted`` came from."""
    problems = [
        f"site {s!r} does not exist in this UNet (its sites: {', '.join(channels)})"
        for s in wanted
        if s not in channels
    ]
    problems += [
        f"site {s!r} has {channels[s]} channels in this UNet but {n} in {source}"
        for s, n in wanted.items()
        if s in channels and n is not None and channels[s] != n
    ]
    return problems
