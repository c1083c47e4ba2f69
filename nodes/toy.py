"""The toy world inside ComfyUI: a held-out start image and its caption, for the shipped toy model."""

from __future__ import annotations

import torch

from toyworld import world

from .native import CATEGORY


class LookBackToyStartImage:
    """A start image of the toy world that the toy model never saw in training, and its caption."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "caption")
    FUNCTION = "make"
    DESCRIPTION = (
        "The first frame of a held-out toy-world clip (a coloured shape on a gradient, 64x64) and its "
        "caption, e.g. 'a red square moving left': the start image and prompt for the toy model."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_number": ("INT", {"default": 0, "min": 0, "max": 999_999,
                                        "tooltip": "Which held-out clip (seeds from 1,000,000 on, never used in training)."}),
            }
        }  # fmt: skip

    def make(self, clip_number: int) -> tuple[torch.Tensor, str]:
        clip = world.make_clip(world.HELD_OUT_SEED + clip_number)
        return torch.from_numpy(clip.frames[0]).float().div(255)[None], clip.caption
