"""ComfyUI nodes of the pack; they only translate between ComfyUI's types and ``lookback_core``."""

from . import host
from .native import (
    LookBackApply,
    LookBackExtendVideo,
    LookBackImageToVideo,
    LookBackJoinVideo,
    LookBackWeightsLoader,
)
from .video import LookBackVideoCombine

host.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "LookBackWeightsLoader": LookBackWeightsLoader,
    "LookBackApply": LookBackApply,
    "LookBackImageToVideo": LookBackImageToVideo,
    "LookBackExtendVideo": LookBackExtendVideo,
    "LookBackJoinVideo": LookBackJoinVideo,
    "LookBackVideoCombine": LookBackVideoCombine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LookBackWeightsLoader": "Look-Back Weights Loader",
    "LookBackApply": "Apply Look-Back",
    "LookBackImageToVideo": "Look-Back Image To Video",
    "LookBackExtendVideo": "Look-Back Extend Video",
    "LookBackJoinVideo": "Look-Back Join Video",
    "LookBackVideoCombine": "Look-Back Video Combine",
}
