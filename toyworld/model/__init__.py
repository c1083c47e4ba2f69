"""The shipped toy model's files (made by ``python -m lookback_cli toyworld build``).

One folder per kind, so a host can list each as a model folder of its own: ``checkpoints/``
holds the toy SD1.5-architecture checkpoint (with its configs embedded), ``lookback/`` its
temporal weights.
"""

from pathlib import Path

TOY_DIR = Path(__file__).parent
TOY_CHECKPOINT_DIR = TOY_DIR / "checkpoints"
TOY_WEIGHTS_DIR = TOY_DIR / "lookback"
TOY_CHECKPOINT = TOY_CHECKPOINT_DIR / "sd15_toy.safetensors"
TOY_WEIGHTS = TOY_WEIGHTS_DIR / "lookback_toy.safetensors"
