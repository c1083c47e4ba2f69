"""ComfyUI nodes of the pack; they only translate between ComfyUI's types and ``lookback_core``."""

from . import host
from .loader import LookBackModelLoader
from .sampler import LookBackSampler
from .video import LookBackVideoCombine

host.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "LookBackModelLoader": LookBackModelLoader,
    "LookBackSampler": LookBackSampler,
    "LookBackVideoCombine": LookBackVideoCombine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LookBackModelLoader": "Look-Back Model Loader",
    "LookBackSampler": "Look-Back I2V Sampler",
    "LookBackVideoCombine": "Look-Back Video Combine",
}
