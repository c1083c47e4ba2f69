"""Building Stable Diffusion 1.5 models offline from a single-file checkpoint.

The diffusers-format configs the weights are loaded into ship with this package
(``configs/sd15``), or travel in the checkpoint's own metadata (:data:`EMBEDDED_CONFIGS_KEY`, as
the toy model's do), so nothing is ever fetched from the Hugging Face hub. The file is read by
:mod:`lookback_core.checkpoint_file`; after conversion every UNet, VAE and text-encoder weight
must come from the file with the shape the config asks for: a checkpoint that does not fit the
config is an error that names the file and the first mismatches, never a model left partly at
random initialisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .checkpoint_file import (
    SHOWN,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_ENCODER_PREFIXES,
    CheckpointError,
    checkpoint_header,
    part_elements,
    read_checkpoint,
    shape_of,
)
from .metadata import model_config_problems, parse_json, size_problems

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"

# Safetensors metadata key of a checkpoint that carries its own diffusers model configs (JSON of
# {"unet": ..., "vae": ..., "text_encoder": ..., optionally "scheduler": ...}); the tokenizer
# stays SD1.5's, and so does the scheduler unless one is given.
EMBEDDED_CONFIGS_KEY = "lookback_sd15_configs"
MODEL_PARTS = ("unet", "vae", "text_encoder")

# What diffusers and transformers raise for a config they cannot build (the checked fields never do)
_BUILD_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    ZeroDivisionError,
)

# Buffers that CLIP checkpoints may or may not carry; transformers rebuilds them itself.
_OPTIONAL_TEXT_KEYS = {"embeddings.position_ids"}


@dataclass
class SD15Components:
    """The parts of an SD1.5 checkpoint, as diffusers and transformers models."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL  # its encoder and quant_conv None when loaded without (load_sd15)
    text_encoder: CLIPTextModel | None  # None when loaded without (load_sd15)
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    path: Path
    family: str = "sd15"


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
        f"{k} is {list(converted[k].shape)} in the file, the config expects {list(shape_of(v))}"
        for k, v in expected.items()
        if k in converted and tuple(converted[k].shape) != shape_of(v)
    ]
    problems = []
    if wrong:
        problems.append(
            "; ".join(wrong[:SHOWN]) + (f" (and {len(wrong) - SHOWN} more)" if len(wrong) > SHOWN else "")
        )
    if missing:
        problems.append(
            f"{len(missing)} weights the config needs are missing, e.g. {', '.join(missing[:SHOWN])}"
        )
    if extra:
        problems.append(f"{len(extra)} weights have no place in the config, e.g. {', '.join(extra[:SHOWN])}")
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
        files["scheduler"] = folder / "scheduler" / "scheduler_config.json"
        read = {}
        for part, file in files.items():
            try:
                read[part] = recorded_config(parse_json(file.read_text(encoding="utf-8"), "it"))
            except (ValueError, TypeError) as err:  # TypeError: JSON that is not an object
                raise CheckpointError(f"{file}: {err}; expected the {part} config (a JSON object)") from None
        _refuse_invalid(folder, "its configs", read)
        return cls(
            configs={part: read[part] for part in MODEL_PARTS},
            sources={part: str(file) for part, file in files.items() if part in MODEL_PARTS},
            scheduler=read["scheduler"],
            folder=folder,
        )

    @classmethod
    def from_metadata(cls, path: Path, text: str, held: Mapping[str, int] | None = None) -> ModelConfigs:
        """The configs a checkpoint carries in its metadata; the tokenizer (and by default the scheduler) is SD1.5's.

        Every field is checked (:func:`lookback_core.metadata.model_config_problems`) and, with
        ``held`` (the file's tensor elements per part), the weights the configs describe must fit in
        the file, all before anything is built: :class:`CheckpointError` names the file and the fields."""
        what = f"its metadata {EMBEDDED_CONFIGS_KEY!r}"
        try:
            configs = parse_json(text, what)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        valid = isinstance(configs, dict) and all(isinstance(configs.get(p), dict) for p in MODEL_PARTS)
        if not (valid and isinstance(configs.get("scheduler", {}), dict)):
            raise CheckpointError(
                f"{path}: {what} is not a JSON object holding the {', '.join(MODEL_PARTS)} configs"
            )
        scheduler = configs.get("scheduler")
        read = {part: recorded_config(configs[part]) for part in MODEL_PARTS}
        read["scheduler"] = (
            recorded_config(scheduler) if scheduler else cls.from_folder(SHIPPED_CONFIG_DIR).scheduler
        )
        _refuse_invalid(path, what, read)
        if held is not None:
            _refuse_invalid(path, what, read, size_problems(read, held))
        return cls(
            configs={part: read[part] for part in MODEL_PARTS},
            sources={part: f"the {part} config in {path.name}'s metadata" for part in MODEL_PARTS},
            scheduler=read["scheduler"],
            folder=SHIPPED_CONFIG_DIR,
        )

    @classmethod
    def for_checkpoint(
        cls,
        path: Path,
        config_dir: Path | None,
        metadata: Mapping[str, str],
        held: Mapping[str, int] | None = None,
    ) -> ModelConfigs:
        """``config_dir`` if given, else the configs the file carries, else the shipped SD1.5 configs.

        ``held``: the file's tensor elements per part (:func:`lookback_core.checkpoint_file.part_elements`),
        which embedded configs must fit."""
        if config_dir is not None:
            return cls.from_folder(config_dir)
        if EMBEDDED_CONFIGS_KEY in metadata:
            return cls.from_metadata(path, metadata[EMBEDDED_CONFIGS_KEY], held)
        return cls.from_folder(SHIPPED_CONFIG_DIR)


def _refuse_invalid(
    where: Path, what: str, configs: Mapping[str, Any], problems: list[str] | None = None
) -> None:
    """:class:`CheckpointError` naming ``where``, ``what`` and the first problems of ``configs``
    (default: :func:`lookback_core.metadata.model_config_problems`)."""
    problems = model_config_problems(configs) if problems is None else problems
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise CheckpointError(f"{where}: {what} cannot be built: " + "; ".join(problems[:SHOWN]) + more)


def read_model_configs(path: str | Path, config_dir: str | Path | None = None) -> ModelConfigs:
    """The configs :func:`load_sd15` would load ``path`` into, checked, from the file's header alone
    (no tensor is read), so a front end names a bad config before any model loads."""
    path = Path(path)
    if config_dir is not None:
        return ModelConfigs.from_folder(Path(config_dir))
    if path.suffix.lower() != ".safetensors":
        return ModelConfigs.from_folder(SHIPPED_CONFIG_DIR)
    shapes, metadata = checkpoint_header(path)
    return ModelConfigs.for_checkpoint(path, None, metadata, part_elements(shapes))


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
    try:  # the configs are checked (lookback_core.metadata); what diffusers still refuses is named too
        if cls is UNet2DConditionModel:
            converted = convert_ldm_unet_checkpoint(state, config)
        else:
            converted = convert_ldm_vae_checkpoint(state, config)
        with torch.device("meta"):  # no random initialisation: every weight is assigned from the file
            model = cls.from_config(config)
    except _BUILD_ERRORS as err:
        raise CheckpointError(f"{path}: {source} cannot be built ({type(err).__name__}: {err})") from None
    _check_fits(path, cls.__name__, source, converted, model.state_dict())
    # Cast before assigning: diffusers' Module.to(dtype) warns about fp32-pinned modules it has none of.
    # (Weights left unread, load_sd15's skipped parts, stay on the meta device.)
    model.load_state_dict(
        {
            k: v.to(dtype=dtype) if v.is_meta else v.to(device=device, dtype=dtype)
            for k, v in converted.items()
        },
        strict=True,
        assign=True,
    )
    return model.eval()


def _load_text_encoder(path: Path, configs: ModelConfigs, state: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """Load ``cond_stage_model.transformer.*`` into CLIPTextModel, with or without ``text_model.`` in the names."""
    try:
        with torch.device("meta"):  # every weight is assigned from the file, as for the UNet and VAE
            model = CLIPTextModel(CLIPTextConfig.from_dict(configs.configs["text_encoder"]))
    except _BUILD_ERRORS as err:
        source = configs.sources["text_encoder"]
        raise CheckpointError(f"{path}: {source} cannot be built ({type(err).__name__}: {err})") from None
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
    vae_encoder: bool = True,
    text_encoder: bool = True,
) -> SD15Components:
    """Load an SD1.5 single-file checkpoint into diffusers/transformers models, fully offline.

    ``vae_encoder=False`` and ``text_encoder=False`` leave those parts out: their weights are not
    read from a ``.safetensors`` file, the VAE's ``encoder`` and ``quant_conv`` are ``None`` and
    so is ``text_encoder`` (a trainer whose latents and captions are cached needs neither).

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
    skip = (*(() if vae_encoder else VAE_ENCODER_PREFIXES), *(() if text_encoder else (TEXT_PREFIX,)))
    state, metadata = read_checkpoint(path, skip)
    configs = ModelConfigs.for_checkpoint(
        path, None if config_dir is None else Path(config_dir), metadata, part_elements(state)
    )
    unet = _load_diffusers_model(path, UNet2DConditionModel, configs, "unet", state, device, dtype)
    vae = _load_diffusers_model(path, AutoencoderKL, configs, "vae", state, device, dtype)
    if not vae_encoder:  # built on the meta device from the unread weights' shapes: dropped
        vae.encoder = vae.quant_conv = None
    text = (
        _load_text_encoder(path, configs, state).to(device=device, dtype=dtype).eval()
        if text_encoder
        else None
    )
    tokenizer = CLIPTokenizer.from_pretrained(configs.folder / "tokenizer", local_files_only=True)
    return SD15Components(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler_config=dict(configs.scheduler),
        path=path,
    )
