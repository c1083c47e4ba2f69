"""ComfyUI nodes of the pack; they only translate between ComfyUI's types and ``lookback_core``."""

from . import host
from .native import (
    LookBackApply,
    LookBackExtendVideo,
    LookBackImageToVideo,
    LookBackJoinVideo,
    LookBackWeightsLoader,
)
from .own_config_checkpoint import LookBackCheckpointLoader
from .toy import LookBackToyStartImage
from .video import LookBackVideoCombine

if host.IN_COMFYUI:
    host.check_host()
host.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "LookBackCheckpointLoader": LookBackCheckpointLoader,
    "LookBackWeightsLoader": LookBackWeightsLoader,
    "LookBackApply": LookBackApply,
    "LookBackImageToVideo": LookBackImageToVideo,
    "LookBackExtendVideo": LookBackExtendVideo,
    "LookBackJoinVideo": LookBackJoinVideo,
    "LookBackVideoCombine": LookBackVideoCombine,
    "LookBackToyStartImage": LookBackToyStartImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LookBackCheckpointLoader": "Look-Back Checkpoint Loader (own configs)",
    "LookBackWeightsLoader": "Look-Back Weights Loader",
    "LookBackApply": "Apply Look-Back",
    "LookBackImageToVideo": "Look-Back Image To Video",
    "LookBackExtendVideo": "Look-Back Extend Video",
    "LookBackJoinVideo": "Look-Back Join Video",
    "LookBackVideoCombine": "Look-Back Video Combine",
    "LookBackToyStartImage": "Look-Back Toy Start Image",
}
