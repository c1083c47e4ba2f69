"""Offline loading of Stable Diffusion 1.5 single-file checkpoints (the original LDM layout).

A single-file checkpoint (``.safetensors``, or a ``.ckpt`` read with ``weights_only=True``) holds
the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the CLIP
ViT-L/14 text encoder under ``cond_stage_model.transformer.``. The diffusers-format configs the
weights are loaded into ship with this package (``configs/sd15``), so nothing is ever fetched
from the Hugging Face hub.

The file is read once. Other model families are refused by name before any conversion, and
after conversion every UNet, VAE and text-encoder weight must come from the file with the shape
the config asks for: a checkpoint that does not fit the config is an error that names the file
and the first mismatches, never a model left partly at random initialisation.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"

UNET_PREFIX = "model.diffusion_model."
# Safetensors metadata key of a checkpoint that carries its own diffusers model configs (JSON of
# {"unet": ..., "vae": ..., "text_encoder": ..., optionally "scheduler": ...}); the tokenizer
# stays SD1.5's, and so does the scheduler unless one is given.
EMBEDDED_CONFIGS_KEY = "lookback_sd15_configs"
MODEL_PARTS = ("unet", "vae", "text_encoder")
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# Buffers that CLIP checkpoints may or may not carry; transformers rebuilds them itself.
_OPTIONAL_TEXT_KEYS = {"embeddings.position_ids"}
_MAX_HEADER_BYTES = 100_000_000
_SHOWN = 3  # mismatches named in one message

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


@dataclass
class SD15Components:
    """The parts of an SD1.5 checkpoint, as diffusers and transformers models."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    path: Path
    family: str = "sd15"


def _shape(value: Any) -> tuple[int, ...]:
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
        _shape(v)[-1]
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
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
        metadata = dict(header.get("__metadata__") or {})
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(
            f"{path}: the safetensors header is corrupt ({err}); expected {expected}"
        ) from err
    if data_end > size - 8 - length:
        raise CheckpointError(
            f"{path}: the file is truncated: its header describes {data_end} bytes of tensor data, "
            f"the file holds {size - 8 - length}"
        )
    return shapes, metadata


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
        shown = ", ".join(f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k in integer[:_SHOWN])
        raise CheckpointError(
            f"{path}: {len(integer)} model weights are not floating point, e.g. {shown}; "
            "expected fp16, bf16 or fp32 weights"
        )
    broken = [k for k in model_keys if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} weights hold NaN or infinite values, e.g. {', '.join(broken[:_SHOWN])}; "
            "the file is damaged (or was saved from a diverged training run)"
        )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint once, refusing other model families before its tensors are loaded when possible.

    Returns the state dict and the file's safetensors metadata (empty for ``.ckpt``)."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint file (expected an SD1.5 .safetensors or .ckpt file)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        shapes, metadata = _read_safetensors_header(path)
        _refuse_other_families(path, shapes)
        try:
            state = load_file(path)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: could not read the safetensors data ({err})") from err
        _check_values(path, state)
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
    return state, {}


def _check_fits(
    path: Path,
    what: str,
    config_file: str,
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, Any],
) -> None:
    """Fail unless ``converted`` has exactly the keys of ``expected``, with the same shapes."""
    missing = [k for k in expected if k not in converted]
    extra = [k for k in converted if k not in expected]
    wrong = [
        f"{k} is {list(converted[k].shape)} in the file, the config expects {list(_shape(v))}"
        for k, v in expected.items()
        if k in converted and tuple(converted[k].shape) != _shape(v)
    ]
    problems = []
    if wrong:
        problems.append(
            "; ".join(wrong[:_SHOWN]) + (f" (and {len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else "")
        )
    if missing:
        problems.append(
            f"{len(missing)} weights the config needs are missing, e.g. {', '.join(missing[:_SHOWN])}"
        )
    if extra:
        problems.append(f"{len(extra)} weights have no place in the config, e.g. {', '.join(extra[:_SHOWN])}")
    if problems:
        raise CheckpointError(
            f"{path}: the {what} does not match {config_file} (weights named as diffusers names them): "
            + "; ".join(problems)
        )


def _check_unet_dims(
    path: Path, unet_state: Mapping[str, torch.Tensor], config: Mapping[str, Any], config_file: str
) -> None:
    """Name the two SD1.5 sizes that most often differ, before the key-by-key check."""
    conv_in = unet_state.get("input_blocks.0.0.weight")
    channels = config["block_out_channels"][0]
    if conv_in is not None and tuple(conv_in.shape[:2]) != (channels, config["in_channels"]):
        raise CheckpointError(
            f"{path}: the UNet's first conv (model.diffusion_model.input_blocks.0.0.weight) has "
            f"{conv_in.shape[0]} output and {conv_in.shape[1]} input channels; {config_file} expects "
            f"block_out_channels[0]={channels} and in_channels={config['in_channels']}"
        )
    context = {int(v.shape[-1]) for k, v in unet_state.items() if k.endswith("attn2.to_k.weight")}
    if context and context != {config["cross_attention_dim"]}:
        raise CheckpointError(
            f"{path}: the UNet's cross-attention context dim is {sorted(context)} in the file; {config_file} "
            f"expects cross_attention_dim={config['cross_attention_dim']}"
        )


# diffusers' note, inside a config, of the fields that took their class default when the model was
# built. ``from_config`` drops the values of the fields it lists, so a value set later with
# ``register_to_config`` (the toy VAE's scaling factor) would silently fall back to the default.
_DEFAULTS_NOTE = "_use_default_values"


def recorded_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config as a file records it: every value kept, without diffusers' defaults note.

    Used when configs are written and when they are read, so a loaded model gets every value the
    file holds (including files written before the note was dropped)."""
    return {k: v for k, v in dict(config).items() if k != _DEFAULTS_NOTE}


@dataclass(frozen=True)
class ModelConfigs:
    """The diffusers/transformers configs a checkpoint is loaded into, and where each came from.

    ``configs`` maps ``unet``, ``vae`` and ``text_encoder`` to config dicts; ``sources`` names
    each one's origin for messages; ``scheduler`` is the noise schedule (and prediction type)
    the UNet was trained with; ``folder`` holds the tokenizer.
    """

    configs: dict[str, dict[str, Any]]
    sources: dict[str, str]
    scheduler: dict[str, Any]
    folder: Path

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfigs:
        for part in (
            *(f"{p}/config.json" for p in MODEL_PARTS),
            "tokenizer",
            "scheduler/scheduler_config.json",
        ):
            if not (folder / part).exists():
                raise FileNotFoundError(f"{folder / part}: missing from the SD1.5 config folder {folder}")
        files = {part: folder / part / "config.json" for part in MODEL_PARTS}
        return cls(
            configs={
                part: recorded_config(json.loads(file.read_text(encoding="utf-8")))
                for part, file in files.items()
            },
            sources={part: str(file) for part, file in files.items()},
            scheduler=recorded_config(
                json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            ),
            folder=folder,
        )

    @classmethod
    def from_metadata(cls, path: Path, text: str) -> ModelConfigs:
        """The configs a checkpoint carries in its metadata; the tokenizer (and by default the scheduler) is SD1.5's."""
        try:
            configs = json.loads(text)
            valid = isinstance(configs, dict) and all(isinstance(configs.get(p), dict) for p in MODEL_PARTS)
            valid = valid and isinstance(configs.get("scheduler", {}), dict)
        except json.JSONDecodeError:
            valid = False
        if not valid:
            raise CheckpointError(
                f"{path}: its metadata {EMBEDDED_CONFIGS_KEY!r} is not a JSON object holding the "
                f"{', '.join(MODEL_PARTS)} configs"
            )
        scheduler = configs.get("scheduler")
        return cls(
            configs={part: recorded_config(configs[part]) for part in MODEL_PARTS},
            sources={part: f"the {part} config in {path.name}'s metadata" for part in MODEL_PARTS},
            scheduler=recorded_config(scheduler)
            if scheduler
            else cls.from_folder(SHIPPED_CONFIG_DIR).scheduler,
            folder=SHIPPED_CONFIG_DIR,
        )

    @classmethod
    def for_checkpoint(cls, path: Path, config_dir: Path | None, metadata: Mapping[str, str]) -> ModelConfigs:
        """``config_dir`` if given, else the configs the file carries, else the shipped SD1.5 configs."""
        if config_dir is not None:
            return cls.from_folder(config_dir)
        if EMBEDDED_CONFIGS_KEY in metadata:
            return cls.from_metadata(path, metadata[EMBEDDED_CONFIGS_KEY])
        return cls.from_folder(SHIPPED_CONFIG_DIR)


def embedded_configs_metadata(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler_config: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Safetensors metadata that lets :func:`load_sd15` load these models' checkpoint with no config folder.

    ``scheduler_config`` (default: SD1.5's) names the noise schedule and prediction type the UNet
    was trained with."""
    configs = {
        "unet": recorded_config(unet.config),
        "vae": recorded_config(vae.config),
        "text_encoder": text_encoder.config.to_dict(),
    }
    if scheduler_config is not None:
        configs["scheduler"] = recorded_config(scheduler_config)
    return {EMBEDDED_CONFIGS_KEY: json.dumps(configs, sort_keys=True, default=list)}


def _load_diffusers_model(
    path: Path,
    cls: type[UNet2DConditionModel] | type[AutoencoderKL],
    configs: ModelConfigs,
    part: str,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
) -> UNet2DConditionModel | AutoencoderKL:
    """Convert the LDM weights with diffusers' own converter and load them, every key accounted for."""
    config, source = configs.configs[part], configs.sources[part]
    if cls is UNet2DConditionModel:
        _check_unet_dims(
            path,
            {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)},
            config,
            source,
        )
        converted = convert_ldm_unet_checkpoint(state, config)
    else:
        converted = convert_ldm_vae_checkpoint(state, config)
    with torch.device("meta"):  # no random initialisation: every weight is assigned from the file
        model = cls.from_config(config)
    _check_fits(path, cls.__name__, source, converted, model.state_dict())
    # Cast before assigning: diffusers' Module.to(dtype) warns about fp32-pinned modules it has none of.
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}, strict=True, assign=True
    )
    return model.eval()


def _load_text_encoder(path: Path, configs: ModelConfigs, state: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """Load ``cond_stage_model.transformer.*`` into CLIPTextModel, with or without ``text_model.`` in the names."""
    with torch.device("meta"):  # every weight is assigned from the file, as for the UNet and VAE
        model = CLIPTextModel(CLIPTextConfig.from_dict(configs.configs["text_encoder"]))
    # transformers 4 names CLIPTextModel's weights "text_model.*", transformers 5 drops the prefix.
    own = {k.removeprefix("text_model."): k for k in model.state_dict()}
    given = {
        k.removeprefix(TEXT_PREFIX).removeprefix("text_model."): v
        for k, v in state.items()
        if k.startswith(TEXT_PREFIX)
    }
    for key in _OPTIONAL_TEXT_KEYS:
        given.pop(key, None)
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if k.removeprefix("text_model.") not in _OPTIONAL_TEXT_KEYS
    }
    renamed = {own.get(k, k): v for k, v in given.items()}
    _check_fits(path, "CLIP text encoder", configs.sources["text_encoder"], renamed, expected)
    model.load_state_dict(renamed, strict=False, assign=True)  # all but the optional buffers: checked above
    positions = model.config.max_position_embeddings
    for name, buffer in model.named_buffers():
        if buffer.is_meta:  # the position ids, which transformers keeps out of state dicts
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                leaf, torch.arange(positions).expand((1, -1)), persistent=False
            )
    return model


def load_sd15(
    path: str | Path,
    *,
    config_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SD15Components:
    """Load an SD1.5 single-file checkpoint into diffusers/transformers models, fully offline.

    ``config_dir`` is a diffusers-layout folder (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``). Without it, a checkpoint that carries its own model configs
    in its metadata (:func:`embedded_configs_metadata`) is loaded into those, and any other into
    the SD1.5 configs shipped in ``lookback_core/configs/sd15``. The hub is never contacted
    (``local_files_only`` everywhere). Raises :class:`CheckpointError` for a missing, unreadable
    or truncated file, for another model family (named), and for any weight that does not fit
    the config.
    """
    path = Path(path)
    if config_dir is not None:
        ModelConfigs.from_folder(Path(config_dir))  # a bad folder is named before the file is read
    state, metadata = read_checkpoint(path)
    configs = ModelConfigs.for_checkpoint(path, None if config_dir is None else Path(config_dir), metadata)
    unet = _load_diffusers_model(path, UNet2DConditionModel, configs, "unet", state, device, dtype)
    vae = _load_diffusers_model(path, AutoencoderKL, configs, "vae", state, device, dtype)
    text_encoder = _load_text_encoder(path, configs, state)
    tokenizer = CLIPTokenizer.from_pretrained(configs.folder / "tokenizer", local_files_only=True)
    return SD15Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.to(device=device, dtype=dtype).eval(),
        tokenizer=tokenizer,
        scheduler_config=dict(configs.scheduler),
        path=path,
    )


def utf8_problem(text: str) -> str | None:
    """Why ``text`` is not valid UTF-8 (Python passes undecodable bytes of a command line on as
    lone surrogates, which no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("utf-8", "surrogateescape")
        return f"is not valid UTF-8 text (byte {bad!r} at character {err.start}); write it in UTF-8"
    return None


def encode_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str], device: torch.device | str
) -> torch.Tensor:
    """Encode prompts the SD1.5 way: pad/truncate to 77 tokens, return the last hidden state ``[n, 77, dim]``."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"encode_prompt needs a non-empty list of prompts, got {prompts!r}")
    max_length = text_encoder.config.max_position_embeddings
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device)).last_hidden_state


def encode_long_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, device: torch.device | str
) -> tuple[torch.Tensor, int]:
    """Encode a prompt of any length as ComfyUI does: ``[1, 77 * k, dim]`` and its token count.

    The prompt's tokens are cut into windows of 75, each encoded as its own 77-token sequence
    (start token, the window, end token, padding), and the results are joined along the
    sequence; nothing is dropped. A prompt of up to 75 tokens gives exactly
    :func:`encode_prompt`'s ``[1, 77, dim]``."""
    length = text_encoder.config.max_position_embeddings
    window = length - 2
    # verbose=False: no warning that the ids exceed the model's length; they are windowed below
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    pieces = [ids[i : i + window] for i in range(0, len(ids), window)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = [
        [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (window - len(piece))
        for piece in pieces
    ]
    with torch.no_grad():
        hidden = text_encoder(torch.tensor(batch, device=device)).last_hidden_state
    return hidden.reshape(1, -1, hidden.shape[-1]), len(ids)


def match_token_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat 77-token windows so a long and a short prompt can share a batch, as ComfyUI does."""
    if a.shape[1] == b.shape[1]:
        return a, b
    length = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, length // a.shape[1], 1), b.repeat(1, length // b.shape[1], 1)
