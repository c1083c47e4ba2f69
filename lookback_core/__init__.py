"""Look-back image-to-video on Stable Diffusion 1.5: model, sampler, weight and video I/O.

The one model code path shared by the trainer, the command line and the ComfyUI nodes. It
needs no ComfyUI. See ``config.py`` for the paper's symbols.
"""

from .config import PRESETS, LookBackConfig, preset
from .lookback import LookBackModule
from .sampler import SamplerSettings, SamplingCancelled, sample_video
from .temporal_unet import LookBackUNet, TemporalModules, create_lookback_unet
from .weights import TemporalWeightsError, load_lookback_unet, read_temporal_header, save_temporal_weights

__all__ = [
    "PRESETS",
    "LookBackConfig",
    "LookBackModule",
    "LookBackUNet",
    "SamplerSettings",
    "SamplingCancelled",
    "TemporalModules",
    "TemporalWeightsError",
    "create_lookback_unet",
    "load_lookback_unet",
    "preset",
    "read_temporal_header",
    "sample_video",
    "save_temporal_weights",
]
