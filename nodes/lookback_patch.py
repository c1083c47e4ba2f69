"""Look-back modules inside ComfyUI's own SD1.5 UNet, and the hybrid start, free of host imports.

Where the modules go. ComfyUI's ``UNetModel`` (LDM layout) offers these patch points, with
``transformer_options["block"]`` naming the block being run:

- ``input_block_patch(h, options)`` after input block K: site ``input.K``;
- ``middle_block_after_patch({"h": h, ...})`` after the middle block: site ``middle``;
- ``output_block_patch(h, hsp, options)`` before output block K+1, where ``h`` is the output of
  block K: site ``output.K``;
- nothing after the last output block: :class:`SiteMarker` is appended to that block by an
  object patch, and a ``forward_timestep_embed_patch`` for its class applies the module.

Frames. One UNet call holds ``len(cond_or_uncond)`` chunks (positive, negative, further
conditionings), each all frames of the video in order, so frames = batch // chunks; the
modules never mix chunks (they see ``[(chunks frames), n, h, w]`` as ``b = chunks``).

The hybrid start (the paper's hybrid initialisation). The LATENT of Look-Back Image To Video
holds the start latent as frame 0 and a noise mask that is 0 on it, so ComfyUI's own inpainting
step returns the start latent as frame 0's denoised output at every step (and the sampler
wrapper returns it exactly in the result, whatever the sampler's last step). A plain mask would
also re-noise frame 0 before the model sees it; the paper shows that fails, so
:func:`pin_model_input` sets every pinned frame of the model input back to the clean latent, divided by the model's input scale ``c_in(sigma)`` (for SD1.5 ``1 / sqrt(sigma^2 + 1)``),
so that the UNet, which is fed ``c_in * x``, sees exactly the clean latent. The pinned frames
travel from the sampler to the model calls in ``transformer_options[PIN_KEY]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from lookback_core.colour_match import match_colour
from lookback_core.long_video import default_context
from lookback_core.memory import latent_video_problem
from lookback_core.rules import check_number
from lookback_core.sites import ldm_site_channels, site_problems
from lookback_core.temporal_unet import TemporalModules
from lookback_core.weights import TemporalHeader, base_problems

logger = logging.getLogger(__name__)

PIN_KEY = "lookback_pinned_frames"
# ComfyUI's UNet patch points the modules ride on (``transformer_options["patches"]`` keys)
INPUT_BLOCK_PATCH = "input_block_patch"
MIDDLE_BLOCK_PATCH = "middle_block_after_patch"
OUTPUT_BLOCK_PATCH = "output_block_patch"
TIMESTEP_EMBED_PATCH = "forward_timestep_embed_patch"
UNET_PATCH_POINTS = (INPUT_BLOCK_PATCH, MIDDLE_BLOCK_PATCH, OUTPUT_BLOCK_PATCH, TIMESTEP_EMBED_PATCH)


def frames_per_call(batch: int, options: dict) -> int:
    """Frames of the video in one UNet call of ``batch`` hidden states."""
    chunks = len(options.get("cond_or_uncond") or (0,))
    if batch % chunks:
        raise ValueError(
            f"look-back: a UNet call of {batch} hidden states cannot hold {chunks} conditioning chunks of "
            "whole videos; something split the frames of one video across calls"
        )
    return batch // chunks


class SiteMarker(nn.Module):
    """Appended to the last output block: where ``forward_timestep_embed_patch`` applies a module.

    Without the patch (the model unpatched) it passes its input through unchanged."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class LookBackPatches:
    """The patch functions that apply ``temporal``'s modules at their sites."""

    temporal: TemporalModules

    def apply(self, site: str, h: torch.Tensor, options: dict) -> torch.Tensor:
        if site not in self.temporal.config.sites:
            return h
        module = self.temporal[site]
        weight = next(module.parameters())
        out = module(h.to(device=weight.device, dtype=weight.dtype), frames_per_call(h.shape[0], options))
        return out.to(device=h.device, dtype=h.dtype)

    def input_block(self, h: torch.Tensor, options: dict) -> torch.Tensor:
        _, k = options["block"]
        return self.apply(f"input.{k}", h, options)

    def middle_block(self, args: dict) -> dict:
        return {**args, "h": self.apply("middle", args["h"], args["transformer_options"])}

    def output_block(
        self, h: torch.Tensor, hsp: torch.Tensor, options: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, k = options["block"]
        return (self.apply(f"output.{k - 1}", h, options) if k > 0 else h), hsp

    def after_last_block(
        self, layer: SiteMarker, x: torch.Tensor, emb: Any, context: Any, options: dict, *_: Any
    ) -> torch.Tensor:
        return self.apply(layer.site, x, options)


def with_marker(block: nn.Sequential, site: str) -> nn.Sequential:
    """A copy of the (last output) block, sharing its layers, with a :class:`SiteMarker` appended."""
    return type(block)(*block, SiteMarker(site))


def add_patches(patcher: Any, patches: LookBackPatches, output_blocks: int) -> None:
    """Places ``patches`` in ``patcher``, a ComfyUI ``ModelPatcher`` of an LDM-layout UNet with
    ``output_blocks`` output blocks: one patch at each patch point, and a :class:`SiteMarker` appended
    to the last output block by an object patch."""
    patcher.set_model_input_block_patch(patches.input_block)
    patcher.set_model_patch(patches.middle_block, MIDDLE_BLOCK_PATCH)
    patcher.set_model_output_block_patch(patches.output_block)
    name = f"diffusion_model.output_blocks.{output_blocks - 1}"
    patcher.add_object_patch(name, with_marker(patcher.get_model_object(name), f"output.{output_blocks - 1}"))
    patcher.set_model_forward_timestep_embed_patch((SiteMarker, patches.after_last_block))


def site_patch_point(site: str, output_blocks: int) -> str:
    """The patch point that applies the module of ``site`` in a UNet with ``output_blocks`` output blocks."""
    if site == f"output.{output_blocks - 1}":
        return TIMESTEP_EMBED_PATCH
    part = site.split(".")[0]
    return {"input": INPUT_BLOCK_PATCH, "middle": MIDDLE_BLOCK_PATCH, "output": OUTPUT_BLOCK_PATCH}[part]


def unet_site_channels(unet_config: dict) -> dict[str, int] | None:
    """The site channels of a ComfyUI ``unet_config``; ``None`` when it is not an LDM-layout UNet
    (a DiT such as Flux or SD3 has no input, middle and output blocks)."""
    keys = ("model_channels", "channel_mult", "num_res_blocks")
    if not all(k in unet_config for k in keys):
        return None
    return ldm_site_channels(*(unet_config[k] for k in keys))


def unet_problems(
    header: TemporalHeader, unet_channels: dict[str, int], context_dim: int | None, latent_scale: float | None
) -> list[str]:
    """Why the weights of ``header`` do not fit a UNet with sites ``unet_channels``, text context
    ``context_dim`` and latent scale ``latent_scale``, by the weights' own facts; empty when they do."""
    config = header.config
    problems = site_problems({s: config.channels.get(s) for s in config.sites}, unet_channels, "the weights")
    # the base's facts first: one line each, where the sites may fill the message
    return base_problems(header, latent_scale=latent_scale, context_dim=context_dim) + problems


def pinned_video_latent(pinned: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
    """A LATENT of ``frames`` frames (in the batch dimension) that begins with the clean frames
    ``pinned`` ``[k, c, h, w]``, kept by a noise mask of 0; the other frames are zeros, so KSampler
    starts them from pure noise, as the paper's hybrid initialisation does."""
    if pinned.ndim != 4 or pinned.shape[0] < 1:
        raise ValueError(f"the pinned latent frames must be [k, c, h, w], got shape {tuple(pinned.shape)}")
    k, c, h, w = pinned.shape
    if frames <= k:
        raise ValueError(f"frames must be more than the {k} pinned frame(s), got {frames}")
    problem = latent_video_problem(frames, c, h, w)  # before anything is allocated
    if problem:
        raise ValueError(f"frames: {problem}; sample a long video in chunks (Look-Back Extend Video)")
    samples = torch.zeros(frames, c, h, w, dtype=torch.float32)
    samples[:k] = pinned
    mask = torch.ones(frames, 1, h, w, dtype=torch.float32)
    mask[:k] = 0
    return {"samples": samples, "noise_mask": mask}


def start_video_latent(start: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
    """The LATENT of a video of ``frames`` frames that starts with the start latent ``[1, c, h, w]``."""
    if start.ndim != 4 or start.shape[0] != 1:
        raise ValueError(f"start latent must be [1, c, h, w], got shape {tuple(start.shape)}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (the start image and one more), got {frames}")
    check_number("frames_at_once", frames, "frames")
    return pinned_video_latent(start, frames)


def continuation_latent(video: dict, frames: int, context_frames: int) -> dict[str, torch.Tensor]:
    """The LATENT of the next chunk of ``video``: its last ``context_frames`` frames pinned as
    clean context, then ``frames`` new ones (a long video in the memory of one chunk)."""
    samples = video["samples"]
    check_number("new_frames", frames, "frames")
    check_number("context_frames", context_frames, "context_frames")
    if not 1 <= context_frames <= samples.shape[0]:
        raise ValueError(
            f"context_frames must be 1..{samples.shape[0]} (the video's frames), got {context_frames}"
        )
    check_number("frames_at_once", context_frames + frames, "context_frames + frames")
    return pinned_video_latent(samples[-context_frames:].float().cpu(), context_frames + frames)


def join_videos(video: dict, continuation: dict) -> dict[str, torch.Tensor]:
    """``video`` followed by the new frames of ``continuation`` (its pinned context dropped)."""
    ahead, more = video["samples"], continuation["samples"]
    if ahead.shape[1:] != more.shape[1:]:
        raise ValueError(
            f"continuation: frames of shape {tuple(more.shape[1:])} cannot follow frames of shape {tuple(ahead.shape[1:])}"
        )
    mask = continuation.get("noise_mask")
    if mask is not None and mask.shape[0] != more.shape[0]:
        raise ValueError(
            f"continuation: its noise_mask covers {mask.shape[0]} frames but it holds {more.shape[0]}; join the "
            "Look-Back Extend Video chunk as KSampler returns it (a mask set in between changes which frames "
            "are its pinned context)"
        )
    new = more if mask is None else more[~pinned_frames(mask)]
    return {"samples": torch.cat([ahead, new.to(ahead)])}


def pinned_frames(denoise_mask: torch.Tensor) -> torch.Tensor:
    """``[frames]`` booleans: the frames the mask keeps whole (0 everywhere)."""
    return denoise_mask.flatten(1).amax(dim=1) == 0


def _replace_frames(x: torch.Tensor, values: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    keep = pinned.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(keep, values.to(x), x)


def pin_model_input(
    x: torch.Tensor, start: torch.Tensor, pinned: torch.Tensor, c_in: torch.Tensor
) -> torch.Tensor:
    """``x`` with its pinned frames set to ``start / c_in``, so the UNet (fed ``c_in * x``) sees
    the clean start latent there. ``x``, ``start`` and ``c_in``: ``[frames, c, h, w]``."""
    return _replace_frames(x, start.to(x) / c_in.to(x), pinned)


def _pinned_in(latent_image: torch.Tensor | None, denoise_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The pinned frames of a sampling run, or ``None`` when it pins none."""
    if denoise_mask is None or latent_image is None or denoise_mask.shape[0] != latent_image.shape[0]:
        return None
    pinned = pinned_frames(denoise_mask)
    return pinned if bool(pinned.any()) else None


def frame_grid(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[f, c, h, w]`` as one picture ``[1, c, rows * h, cols * w]``, row by row, in a grid as
    near square as the count allows (the cells after the last frame zero), for ComfyUI's previewers,
    which decode the first picture of a batch."""
    count, channels, height, width = frames.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cells = frames.new_zeros(rows * cols, channels, height, width)
    cells[:count] = frames
    return rearrange(cells, "(r k) c h w -> 1 c (r h) (k w)", r=rows)


def sampler_sample_wrapper(executor: Callable, guider: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any,
                           noise: torch.Tensor, latent_image: torch.Tensor | None, denoise_mask: torch.Tensor | None,
                           disable_pbar: bool, horizon: int | None = None, depth: int | None = None,
                           context: int | None = None, colour_match: str = "off",
                           preview: Callable | None = None) -> torch.Tensor:  # fmt: skip
    """ComfyUI's SAMPLER_SAMPLE wrapper: hands the pinned frames and their clean latents (already in
    the model's latent space) to the model calls of this sampling run, and returns the pinned
    frames exactly (a multistep sampler such as uni_pc ends a little off the last denoised output,
    which ComfyUI's inpainting step pins). A video longer than the weights' ``horizon`` (the frames
    they were checked for at once) is sampled as asked, with a warning that says how to chunk it
    (with the weights' look-back ``depth`` and recorded ``context``: the frames each chunk starts
    from, :func:`lookback_core.long_video.default_context`).
    ``colour_match`` ``first_frame``: the new frames' colour statistics are set to the first pinned
    frame's (:func:`lookback_core.colour_match.match_colour`), as the command line's sampler does.
    ``preview(callback, guider)``: the host's step callback, wrapped so its live preview shows every
    frame (``host.every_frame_preview``)."""
    if horizon is not None and latent_image is not None and latent_image.shape[0] > horizon:
        context = default_context(horizon, depth, context)
        logger.warning(
            "Look-Back: sampling %d frames at once, more than these weights were checked for (%d); for a "
            "longer video, sample %d and continue with Look-Back Extend Video (context_frames %d, frames %d)",
            latent_image.shape[0], horizon, horizon, context, horizon - context,
        )  # fmt: skip
    pinned = _pinned_in(latent_image, denoise_mask)
    if pinned is not None:
        extra_args["model_options"].setdefault("transformer_options", {})[PIN_KEY] = (latent_image, pinned)
        if preview is not None and callback is not None:
            callback = preview(callback, guider)
    samples = executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
    if pinned is None:
        return samples
    if colour_match == "first_frame":
        samples = match_colour(samples, latent_image[int(pinned.nonzero()[0])][None].to(samples))
    return _replace_frames(samples, latent_image, pinned)


def predict_noise_wrapper(executor: Callable, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                          seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """ComfyUI's PREDICT_NOISE wrapper: every model call (CFG, all conditionings, ControlNet) sees
    the pinned frames clean."""
    pin = model_options.get("transformer_options", {}).get(PIN_KEY)
    if pin is not None and pin[0].shape == x.shape:
        start, pinned = pin
        sampling = executor.class_obj.inner_model.model_sampling
        x = pin_model_input(x, start, pinned, sampling.calculate_input(timestep, torch.ones_like(x)))
    return executor(x, timestep, model_options, seed)
