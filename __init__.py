"""ComfyUI entry point of the Look-Back I2V node pack (ComfyUI loads this from custom_nodes/).

The pack's folder is put on ``sys.path`` so ``lookback_core``, the model library shared with the
command line and the trainer (and ``toyworld``, for the toy start image), imports under its own
name whatever the folder is called.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
