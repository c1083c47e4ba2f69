"""Look-Back I2V Sampler: hybrid-initialised DDIM from a start image to LATENT frames."""

from __future__ import annotations

import logging

import torch

from lookback_core.long_video import resolve_chunking, sample_long_video
from lookback_core.sampler import SamplerSettings
from lookback_core.sd15 import match_token_lengths

from . import bridge, host
from .loader import CATEGORY, LookBackModel

logger = logging.getLogger(__name__)


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


def sample_frames(
    bundle: LookBackModel,
    start_latent: torch.Tensor,
    positive: list,
    negative: list,
    frames: int,
    settings: SamplerSettings,
    chunk_frames: int = 0,
    context_frames: int = 0,
) -> dict:
    """Sample ``frames`` frames per start latent (``[b, 4, h, w]``, ComfyUI's raw space); returns a LATENT.

    ``chunk_frames`` > 0 samples longer videos in chunks (memory of one chunk) that continue from
    ``context_frames`` frames of the previous chunk (0: the look-back depth d).
    """
    dim = bundle.context_dim
    pos = bridge.conditioning_embeddings(positive, "positive", dim)
    neg = bridge.conditioning_embeddings(negative, "negative", dim)
    pos, neg = match_token_lengths(pos, neg)
    device = host.compute_device()
    dtype = host.compute_dtype(device, bundle.precision)
    model = bundle.model
    host.make_room(device, module_bytes(model, dtype))
    model.to(device=device, dtype=dtype)
    try:
        z0 = bridge.latent_in(start_latent).to(device=device, dtype=dtype)
        b = z0.shape[0]
        latents = sample_long_video(
            model,
            z0,
            pos.to(device=device, dtype=dtype).expand(b, -1, -1),
            neg.to(device=device, dtype=dtype).expand(b, -1, -1),
            frames,
            settings,
            bundle.scheduler_config,
            chunk_frames=chunk_frames or None,
            context_frames=context_frames or None,
            on_step=host.progress_reporter(settings.steps, device),
            should_cancel=host.cancel_requested,
        )
    finally:
        model.to(device=host.offload_device())
        host.release(device)
    return bridge.video_latent_out(latents)


class LookBackSampler:
    """Turns a start image into video frames; frame 0 stays the image at every step."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Hybrid-initialised DDIM: frame 0 is pinned to the start image's latent, frames 1.. are "
        "denoised with the look-back model. Decode the frames with a standard VAE Decode."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lookback_model": ("LOOKBACK_MODEL", {"tooltip": "From Look-Back Model Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt (CLIP Text Encode with the same checkpoint)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt for classifier-free guidance."}),
                "frames": ("INT", {"default": 16, "min": 2, "max": 4096, "tooltip": "Frames, including the start image."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "DDIM steps."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale; 1 uses the positive prompt alone."}),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "DDIM eta: 0 is deterministic DDIM, 1 adds DDPM-like noise."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "control_after_generate": True, "tooltip": "Noise seed; same seed, same video."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Start image (needs vae). Sides are cropped to multiples of 8."}),
                "vae": ("VAE", {"tooltip": "Encodes the start image."}),
                "start_latent": ("LATENT", {"tooltip": "Start latent instead of image + vae."}),
                "chunk_frames": ("INT", {"default": 0, "min": 0, "max": 256,
                                         "tooltip": "0: all frames at once. Otherwise longer videos are made in chunks of this many frames, in the memory of one chunk."}),
                "context_frames": ("INT", {"default": 0, "min": 0, "max": 255,
                                           "tooltip": "Frames of the previous chunk each chunk continues from; 0 uses the look-back depth d."}),
            },
        }  # fmt: skip

    def sample(
        self,
        lookback_model: LookBackModel,
        positive: list,
        negative: list,
        frames: int,
        steps: int,
        cfg: float,
        eta: float,
        seed: int,
        image: torch.Tensor | None = None,
        vae=None,
        start_latent: dict | None = None,
        chunk_frames: int = 0,
        context_frames: int = 0,
    ) -> tuple[dict]:
        settings = SamplerSettings(steps=steps, cfg_scale=cfg, eta=eta, seed=seed)
        config = lookback_model.model.config
        resolve_chunking(
            frames, chunk_frames or None, context_frames or None, config.depth if config is not None else None,
            names=("frames", "chunk_frames", "context_frames"),
        )  # fmt: skip
        if start_latent is not None:
            start = start_latent["samples"]
        elif image is not None and vae is not None:
            image, message = bridge.crop_to_multiple_of_8(image)
            if message:
                logger.warning("Look-Back I2V Sampler: %s", message)
            start = vae.encode(image[:, :, :, :3])
        else:
            raise ValueError("Look-Back I2V Sampler needs a start: connect image and vae, or start_latent")
        return (
            sample_frames(
                lookback_model, start, positive, negative, frames, settings, chunk_frames, context_frames
            ),
        )
