"""The pack's model nodes: look-back on the user's own MODEL, sampled by ComfyUI's KSampler.

- Look-Back Weights Loader reads a temporal weights file once (checked, cached);
- Apply Look-Back clones a MODEL and places the modules in it (:mod:`nodes.lookback_patch`
  says where and how), registered with ComfyUI so they load, cast and offload with the UNet;
- Look-Back Image To Video encodes the start image into a LATENT of frames that pins frame 0;
- Look-Back Extend Video and Look-Back Join Video make long videos chunk by chunk, each chunk
  sampled by its own KSampler, continuing from the last frames of the one before.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass

import torch
from einops import rearrange

from lookback_core.image_prep import fit_to_multiple
from lookback_core.rules import MAX_FRAMES_AT_ONCE, SAMPLER_SETTINGS, shown
from lookback_core.sampler import COLOUR_MATCHES, check_setting
from lookback_core.temporal_unet import TemporalModules
from lookback_core.weights import TemporalHeader, TemporalWeightsError, describe_base, load_temporal_weights

from . import host
from .lookback_patch import (
    LookBackPatches,
    add_patches,
    continuation_latent,
    join_videos,
    predict_noise_wrapper,
    sampler_sample_wrapper,
    start_video_latent,
    unet_problems,
    unet_site_channels,
)

logger = logging.getLogger(__name__)
CATEGORY = "Look-Back I2V"
WRAPPER_KEY = "lookback_i2v"  # also the key of the modules among the MODEL's additional models
RECOMMENDED = "as the weights recommend"  # a setting's choice that takes the weights' value


@dataclass(frozen=True)
class LookBackWeights:
    """What flows along a LOOKBACK_WEIGHTS link: the modules (fp32, CPU) and the file's header."""

    temporal: TemporalModules
    header: TemporalHeader
    name: str

    def __repr__(self) -> str:  # ComfyUI puts inputs' reprs into error reports: no module tree, never raises
        return f"LookBackWeights({shown(self.name)}, {self.describe_base()})"

    def describe_base(self) -> str:
        """What the weights were trained on, in their own words (the facts their file records)."""
        return describe_base(self.header)


@functools.lru_cache(maxsize=4)
def _read_weights(path: str, _mtime_ns: int, _size: int) -> LookBackWeights:
    temporal, header = load_temporal_weights(path)
    return LookBackWeights(temporal, header, os.path.basename(path))


def read_weights(path: str | os.PathLike) -> LookBackWeights:
    """The weights of ``path``, read once for as long as the file does not change."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise TemporalWeightsError(path, f"cannot be read ({err.strerror})") from None
    return _read_weights(os.fspath(path), stat.st_mtime_ns, stat.st_size)


def apply_lookback(model, weights: LookBackWeights, colour_match: str = RECOMMENDED):
    """A clone of the ComfyUI MODEL ``model`` with the look-back modules of ``weights`` in it;
    ``colour_match`` (``off``, ``first_frame``, or :data:`RECOMMENDED`: as the weights recommend)
    is applied to what KSampler returns (:mod:`lookback_core.colour_match`)."""
    if colour_match == RECOMMENDED:
        colour_match = weights.header.recommended_sampler.get("colour_match", "off")
    check_setting("colour_match", colour_match)
    base = model.model
    unet_config = base.model_config.unet_config
    channels = unet_site_channels(unet_config)
    if channels is None:
        raise ValueError(
            f"model: this MODEL ({type(base.model_config).__name__}) is not a UNet of the SD1.5 layout; the "
            f"look-back weights {weights.name} need an SD1.5 checkpoint's MODEL"
        )
    problems = unet_problems(
        weights.header, channels, unet_config.get("context_dim"), base.latent_format.scale_factor
    )
    if problems:
        raise ValueError(
            f"model: this MODEL ({type(base.model_config).__name__}, {len(channels)} sites) does not fit the "
            f"look-back weights {weights.name} ({weights.describe_base()}): "
            + "; ".join(problems[:5])
            + "; load the checkpoint they were trained on, or weights trained for this model"
        )
    if model.get_additional_models_with_key(WRAPPER_KEY):
        raise ValueError("model: Apply Look-Back was already applied to this MODEL; apply it once")
    patched = model.clone()
    temporal = copy.deepcopy(weights.temporal).to(dtype=base.get_dtype_inference())
    patches = LookBackPatches(temporal)
    add_patches(patched, patches, len(base.diffusion_model.output_blocks))
    patched.set_additional_models(WRAPPER_KEY, [host.companion_model(temporal, model)])
    patched.add_wrapper_with_key(
        host.SAMPLER_SAMPLE,
        WRAPPER_KEY,
        functools.partial(
            sampler_sample_wrapper,
            horizon=weights.header.horizon_frames,
            depth=weights.header.config.depth,
            context=weights.header.context_frames,
            colour_match=colour_match,
            preview=host.every_frame_preview if host.IN_COMFYUI else None,
        ),
    )
    patched.add_wrapper_with_key(host.PREDICT_NOISE, WRAPPER_KEY, predict_noise_wrapper)
    return patched


class LookBackWeightsLoader:
    """Reads look-back temporal weights from ``models/lookback``."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LOOKBACK_WEIGHTS",)
    RETURN_NAMES = ("lookback_weights",)
    FUNCTION = "load"
    DESCRIPTION = "Reads look-back temporal weights (trained with training/train.py) for Apply Look-Back."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lookback_name": (
                    host.model_files(host.LOOKBACK_FOLDER),
                    {"tooltip": "Look-back temporal weights (.safetensors) from models/lookback."},
                )
            }
        }

    def load(self, lookback_name: str) -> tuple[LookBackWeights]:
        return (read_weights(host.model_path(host.LOOKBACK_FOLDER, lookback_name)),)


class LookBackApply:
    """Adds the look-back modules to an SD1.5 MODEL; sample it with KSampler."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Adds look-back temporal modules to an SD1.5 MODEL (LoRAs and other patches stay). Sample a "
        "LATENT from Look-Back Image To Video with KSampler: any sampler and scheduler, denoise 1.0."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 MODEL (Load Checkpoint, LoRAs, ...)."}),
                "lookback_weights": ("LOOKBACK_WEIGHTS", {"tooltip": "From Look-Back Weights Loader."}),
            },
            "optional": {
                "colour_match": SAMPLER_SETTINGS["colour_match"].comfy_input(
                    choices=[RECOMMENDED, *COLOUR_MATCHES], default=RECOMMENDED,
                    tooltip=SAMPLER_SETTINGS["colour_match"].help + "; the default is what the weights recommend "
                    "(the shipped toy's: first_frame).",
                ),
            },
        }  # fmt: skip

    def apply(self, model, lookback_weights: LookBackWeights, colour_match: str = RECOMMENDED) -> tuple:
        return (apply_lookback(model, lookback_weights, colour_match),)


class LookBackImageToVideo:
    """The start image as frame 0 of a LATENT of frames, pinned for every sampler step."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "Encodes the start image with the VAE as frame 0 of a video LATENT (frames in the batch "
        "dimension); KSampler with an Apply Look-Back MODEL keeps frame 0 the image and makes the rest."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                "image": ("IMAGE", {"tooltip": "The start image (one). Sides are cropped to multiples of 8."}),
                "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES_AT_ONCE, "tooltip": "Frames, including the start image."}),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }  # fmt: skip

    def encode(self, vae, image: torch.Tensor, frames: int, node_id: str | None = None) -> tuple[dict]:
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(
                f"image: an IMAGE is [batch, height, width, 3], got shape {list(image.shape)}; connect an "
                "image (Load Image, a decoder) here"
            )
        if image.shape[0] != 1:
            raise ValueError(
                f"image: a batch of {image.shape[0]} images; a video starts from one image "
                "(pick one with Image From Batch)"
            )
        if not torch.isfinite(image).all():  # named now, not as a NaN video after sampling
            raise ValueError("image: holds NaN or infinite pixel values; expected finite pixels in [0, 1]")
        pixels, message = fit_to_multiple(rearrange(image[..., :3], "b h w c -> b c h w"))
        if message:
            logger.warning("Look-Back Image To Video: %s", message)
            host.show_on_node(message, node_id)
        start = vae.encode(rearrange(pixels, "b c h w -> b h w c"))
        return (start_video_latent(start.float().cpu(), frames),)


class LookBackExtendVideo:
    """The next chunk of a long video: the last frames of the video so far, pinned, and new frames."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "extend"
    DESCRIPTION = (
        "A LATENT that continues a video: its last context_frames frames pinned as clean context, then "
        "frames new ones. Sample it with KSampler (same Apply Look-Back MODEL), then Look-Back Join Video. "
        "KSampler seed N + i on chunk i (the first: seed N), ddim/ddim_uniform, samples the chunks of "
        "generate --seed N with the same chunking."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "video": ("LATENT", {"tooltip": "The video so far (a KSampler or Look-Back Join Video output)."}),
                "frames": ("INT", {"default": 11, "min": 1, "max": MAX_FRAMES_AT_ONCE - 1,
                                   "tooltip": "New frames in this chunk; with context_frames, at most the frames the weights were checked for at once (the shipped toy's: 16)."}),
                "context_frames": ("INT", {"default": 5, "min": 1, "max": 64,
                                           "tooltip": "Frames of the video so far the chunk continues from; the weights record the number they were checked with, and Apply Look-Back's warning past their horizon names it (the shipped toy's: 5; with 3, as many as one look-back conv reads, its objects turned in the second chunk)."}),
            }
        }  # fmt: skip

    def extend(self, video: dict, frames: int, context_frames: int) -> tuple[dict]:
        return (continuation_latent(video, frames, context_frames),)


class LookBackJoinVideo:
    """A video followed by the new frames of its sampled continuation."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("video",)
    FUNCTION = "join"
    DESCRIPTION = (
        "Appends the new frames of a sampled Look-Back Extend Video chunk (its pinned context dropped)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "video": ("LATENT", {"tooltip": "The video so far."}),
                "continuation": (
                    "LATENT",
                    {"tooltip": "KSampler's output for the Look-Back Extend Video chunk."},
                ),
            }
        }

    def join(self, video: dict, continuation: dict) -> tuple[dict]:
        return (join_videos(video, continuation),)
