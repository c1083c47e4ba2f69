"""Reading Stable Diffusion 1.5 single-file checkpoints (the original LDM layout), safely.

A single-file checkpoint (``.safetensors``, or a ``.ckpt`` read with ``weights_only=True``) holds
the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the CLIP
ViT-L/14 text encoder under ``cond_stage_model.transformer.``. The file is read once. Other model
families (:func:`detect_family`) are refused by name before any tensor is loaded where the file
allows it, and so are integer-typed or non-finite weights; nothing is ever unpickled beyond
torch's safe loader.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .atomic import file_problem
from .metadata import parse_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# the VAE's encoding half: what only turns images into latents
VAE_ENCODER_PREFIXES = (VAE_PREFIX + "encoder.", VAE_PREFIX + "quant_conv.")
_MAX_HEADER_BYTES = 100_000_000
SHOWN = 3  # mismatches named in one message

_FAMILY_NAMES = {
    "sdxl": "an SDXL checkpoint",
    "sd2": "an SD2.x checkpoint",
    "sd3": "an SD3 checkpoint",
    "flux": "a FLUX checkpoint",
    "svd": "a Stable Video Diffusion checkpoint",
    "lora": "a LoRA, not a full checkpoint",
    "diffusers": "a diffusers-format model file, not a single-file checkpoint",
    "vae": "a standalone VAE, not a full checkpoint",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as SD1.5; the message names the file and what was expected."""


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_family(state_dict_keys_and_shapes: Mapping[str, Any]) -> str:
    """Name the model family of a single-file checkpoint from its key names (and a few shapes).

    Values may be tensors or shapes. Returns one of ``"sd15"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``,
    ``"flux"``, ``"svd"``, ``"lora"``, ``"diffusers"``, ``"vae"`` or ``"unknown"``. SD1.x is
    decided structurally (an LDM UNet and a CLIP-L style text encoder, no SDXL conditioner), so
    checkpoints of the SD1.5 architecture with any channel counts count as ``"sd15"``; whether
    the sizes fit a config is checked when loading.
    """
    keys = list(state_dict_keys_and_shapes)

    def has(pattern: str) -> bool:
        regex = re.compile(pattern)
        return any(regex.search(k) for k in keys)

    ldm_unet = has(r"^model\.diffusion_model\.input_blocks\.")
    if has(r"lora_(up|down|A|B)\b|^lora_(unet|te)_") and not ldm_unet:
        return "lora"
    if has(r"(^|\.)double_blocks\.\d+\.") and has(r"(^|\.)single_blocks\.\d+\."):
        return "flux"
    if has(r"(^|\.)joint_blocks\.\d+\."):
        return "sd3"
    if ldm_unet and has(r"^model\.diffusion_model\..*\.time_(stack|mixer)"):
        return "svd"
    if has(r"^conditioner\.embedders\."):
        return "sdxl"
    context_dims = {
        shape_of(v)[-1]
        for k, v in state_dict_keys_and_shapes.items()
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    }
    if has(r"^cond_stage_model\.model\.") or 1024 in context_dims:  # OpenCLIP ViT-H (SD2, SD2 unCLIP)
        return "sd2"
    if has(r"^model\.diffusion_model\.label_emb\.") or 2048 in context_dims:
        return "sdxl"
    if ldm_unet and has(r"^cond_stage_model\.transformer\.(text_model\.)?encoder\.layers\."):
        return "sd15"
    if has(
        r"^(unet\.)?(down_blocks|mid_block|up_blocks)\.|^(encoder|decoder)\.(down|up)_blocks\.|^text_model\.encoder\.layers\."
    ):
        return "diffusers"
    if not ldm_unet and has(r"^(first_stage_model\.|vae\.)?encoder\.down\.") and has(r"decoder\.up\."):
        return "vae"
    return "unknown"


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Validate a safetensors header (and that the file holds all the data it announces).

    Returns the tensor shapes and the header's metadata."""
    size = path.stat().st_size
    expected = "a .safetensors file (an 8-byte header length, a JSON header, then the tensor data)"
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a readable safetensors file; expected {expected}")
            header = parse_json(f.read(length), "the JSON header")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
        metadata = dict(header.get("__metadata__") or {})
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except CheckpointError:
        raise
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(
            f"{path}: the safetensors header is corrupt ({err}); expected {expected}"
        ) from err
    if data_end > size - 8 - length:
        raise CheckpointError(
            f"{path}: the file is truncated: its header describes {data_end} bytes of tensor data, "
            f"the file holds {size - 8 - length}"
        )
    return shapes, metadata


PART_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}


def part_elements(shapes: Mapping[str, Any]) -> dict[str, int]:
    """Elements of the UNet's, the VAE's and the text encoder's tensors (``shapes``: key -> tensor or shape)."""
    return {
        part: sum(math.prod(shape_of(v)) for k, v in shapes.items() if k.startswith(prefix))
        for part, prefix in PART_PREFIXES.items()
    }


def checkpoint_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and the metadata of a ``.safetensors`` checkpoint, from its header alone
    (no tensor is read); ``CheckpointError`` for a missing, unreadable or damaged file."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        problem = "no such checkpoint file" if problem == "no such file" else problem
        raise CheckpointError(f"{path}: {problem} (expected an SD1.5 .safetensors or .ckpt file)")
    return _read_safetensors_header(path)


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a checkpoint, from its header alone (no tensor is read)."""
    return _read_safetensors_header(Path(path))[1]


def tensor_elements(path: Path) -> int:
    """Elements of all tensors in a weights file: from the header of a ``.safetensors`` file, without
    reading its data; for a ``.ckpt`` file estimated from its size (as fp16, the common case)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        shapes, _ = _read_safetensors_header(path)
        return sum(math.prod(shape) for shape in shapes.values())
    return path.stat().st_size // 2


def _refuse_other_families(path: Path, shapes: Mapping[str, Any]) -> None:
    """Refuse another model family by name, and an SD1.5 file that lacks one of its three parts."""
    family = detect_family(shapes)
    if family in _FAMILY_NAMES:
        raise CheckpointError(f"{path} is {_FAMILY_NAMES[family]}; this node pack needs an SD1.5 checkpoint")
    parts = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "CLIP text encoder": TEXT_PREFIX}
    missing = [
        f"{name} ({prefix}*)"
        for name, prefix in parts.items()
        if not any(k.startswith(prefix) for k in shapes)
    ]
    if missing or family != "sd15":
        detail = (
            f"it has no {' and no '.join(missing)} weights" if missing else "its key layout is not recognised"
        )
        raise CheckpointError(
            f"{path} is not a complete SD1.5 single-file checkpoint: {detail}; expected the UNet, VAE and "
            "CLIP text encoder in the original LDM layout"
        )


def _unpickling_refusal(path: Path, torch_message: str) -> str:
    """Our words for a ``torch.load(weights_only=True)`` refusal.

    torch's own message advises re-running with ``weights_only=False``, i.e. running the file's
    code; it is never passed on. Only the global the file wanted, or the unpickler's one-line
    reason, is quoted."""
    found = re.search(r"GLOBAL:?\s+([\w.]+)", torch_message)
    if found:
        return (
            f"{path}: holds Python objects other than tensors (it pickles {found.group(1)}), so it is "
            "refused: .ckpt files are only read with torch.load(weights_only=True), which never runs "
            "code from the file. Use a .safetensors version of this checkpoint."
        )
    after = torch_message.partition("WeightsUnpickler error:")[2]
    reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
    detail = f" ({reason})" if reason and "weights_only" not in reason else ""
    return (
        f"{path}: not a readable PyTorch checkpoint: it is damaged or not a pickle of tensors{detail}; "
        "expected an SD1.5 .ckpt state dict or a .safetensors file"
    )


def _check_values(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse integer-typed model weights and NaN or infinite values, naming the first few keys.

    (Only ``position_ids`` of the text encoder are integers in an SD1.5 file.)"""
    model_keys = [k for k in state if k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))]
    integer = [k for k in model_keys if not state[k].is_floating_point() and not k.endswith("position_ids")]
    if integer:
        shown = ", ".join(f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k in integer[:SHOWN])
        raise CheckpointError(
            f"{path}: {len(integer)} model weights are not floating point, e.g. {shown}; "
            "expected fp16, bf16 or fp32 weights"
        )
    broken = [k for k in model_keys if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} weights hold NaN or infinite values, e.g. {', '.join(broken[:SHOWN])}; "
            "the file is damaged (or was saved from a diverged training run)"
        )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _placeholder(tensor_slice) -> torch.Tensor:
    """A ``meta`` tensor of a safetensors slice's shape and dtype: nothing is read."""
    return torch.empty(
        tensor_slice.get_shape(), dtype=_SAFETENSORS_DTYPES[tensor_slice.get_dtype()], device="meta"
    )


def read_checkpoint(path: Path, skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint once, refusing other model families before its tensors are loaded when possible.

    Returns the state dict and the file's safetensors metadata (empty for ``.ckpt``). Tensors whose
    names start with one of ``skip`` are not read (from a ``.safetensors`` file) and come back as
    ``meta`` tensors of their shape and dtype: the parts a caller will not run."""
    problem = file_problem(path)
    if problem:
        problem = "no such checkpoint file" if problem == "no such file" else problem
        raise CheckpointError(f"{path}: {problem} (expected an SD1.5 .safetensors or .ckpt file)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        shapes, metadata = _read_safetensors_header(path)
        _refuse_other_families(path, shapes)
        try:
            with safe_open(path, framework="pt") as f:
                state = {
                    k: _placeholder(f.get_slice(k)) if skip and k.startswith(skip) else f.get_tensor(k)
                    for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
                }
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: could not read the safetensors data ({err})") from err
        _check_values(path, {k: v for k, v in state.items() if not v.is_meta})
        return state, metadata
    if suffix not in (".ckpt", ".pt", ".pth"):
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors or .ckpt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unpickling_refusal(path, str(err))) from None
    except Exception as err:  # torch.load reports a damaged file with many exception types
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = (
        {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not state:
        raise CheckpointError(
            f"{path}: holds no tensors; expected an SD1.5 state dict (optionally under 'state_dict')"
        )
    _refuse_other_families(path, state)
    _check_values(path, state)
    if skip:
        state = {k: v.to("meta") if k.startswith(skip) else v for k, v in state.items()}
    return state, {}
