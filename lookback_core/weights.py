"""Temporal weights files: the look-back modules only, as ``.safetensors`` with metadata.

Header metadata (all strings, as safetensors requires):

- ``format``: :data:`FORMAT_TAG`; ``format_version``: an integer;
- ``config``: the full :class:`~lookback_core.config.LookBackConfig` as JSON (d, kernels, sites
  and their channels, padding, variants);
- ``base_family``: the base model family the modules were trained on (``sd15``);
- ``training``: JSON of training facts (frames, stride, resolution, steps, ...);
- ``recommended_sampler``: JSON of the sampler settings the weights are meant to be used with
  (any of ``steps``, ``cfg_scale``, ``eta``, ``first_frame``; optional). Front ends use them
  where the user gives none;
- ``horizon_frames``: the longest video, in frames, the weights were checked to sample in one
  piece (optional); front ends sample longer videos in chunks of this many frames unless told
  otherwise (:func:`lookback_core.long_video.resolve_chunking`);
- ``context_frames``: how many frames of the video so far each such chunk starts from, as they
  were checked (optional; without it, the look-back depth ``d``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .atomic import file_problem, save_safetensors
from .config import FORMAT_VERSION, LookBackConfig
from .latents import same_scale
from .metadata import parse_json, training_fact_problems
from .rules import is_number, shown
from .sampler import SETTING_RULES, InvalidSetting, check_setting
from .sites import site_channels, site_problems
from .temporal_unet import LookBackUNet, TemporalModules

FORMAT_TAG = "lookback-i2v-temporal"
BASE_FAMILY = "sd15"
_MAX_LISTED = 5
# the SamplerSettings fields a weights file may recommend: every one but the seed
RECOMMENDABLE = tuple(name for name in SETTING_RULES if name != "seed")


class TemporalWeightsError(ValueError):
    """A temporal weights file that cannot be used; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, problems: str | list[str]) -> None:
        problems = [problems] if isinstance(problems, str) else problems
        shown = problems[:_MAX_LISTED]
        more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        super().__init__(f"temporal weights file {os.fspath(path)!r}: " + "; ".join(shown) + more)
        self.path = Path(path)
        self.problems = problems


@dataclass(frozen=True)
class TemporalHeader:
    """What a temporal weights file says about itself (its metadata)."""

    config: LookBackConfig
    training: dict[str, Any] = field(default_factory=dict)
    base_family: str = BASE_FAMILY
    recommended_sampler: dict[str, Any] = field(default_factory=dict)
    horizon_frames: int | None = None
    context_frames: int | None = None


def _frame_count(frames: Any, name: str, least: int) -> int:
    """A valid frame count for ``name`` (an integer of at least ``least``); raises ValueError otherwise."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < least:
        raise ValueError(f"{name} must be a whole number of frames >= {least}, got {frames!r}")
    return frames


def check_chunking(horizon: Any, context: Any) -> tuple[int | None, int | None]:
    """A valid horizon and chunk context (each optional; a context needs a horizon it is shorter
    than, since it starts each chunk of that many frames); raises ValueError otherwise."""
    horizon = None if horizon is None else _frame_count(horizon, "horizon_frames", 2)
    if context is None:
        return horizon, None
    context = _frame_count(context, "context_frames", 1)
    if horizon is None or context >= horizon:
        raise ValueError(f"context_frames ({context}) must be below horizon_frames ({horizon})")
    return horizon, context


def check_recommended_sampler(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate recommended sampler settings; raises ValueError naming the bad entry."""
    if not isinstance(settings, dict):
        raise ValueError(f"recommended sampler settings must be a JSON object, got {settings!r}")
    unknown = sorted(set(settings) - set(RECOMMENDABLE))
    if unknown:
        raise ValueError(f"unknown recommended sampler setting(s) {unknown}; known: {list(RECOMMENDABLE)}")
    for key, value in settings.items():
        try:
            check_setting(key, value)
        except InvalidSetting as err:
            raise ValueError(f"recommended sampler setting {err}") from None
    return dict(settings)


def save_temporal_weights(
    path: str | os.PathLike,
    temporal: TemporalModules | LookBackUNet,
    *,
    training: dict[str, Any] | None = None,
    base_family: str = BASE_FAMILY,
    recommended_sampler: dict[str, Any] | None = None,
    horizon_frames: int | None = None,
    context_frames: int | None = None,
) -> Path:
    """Write the look-back modules to ``path`` atomically (temporary file, then rename).

    ``recommended_sampler`` (any of :data:`RECOMMENDABLE`) is what front ends use
    where the user sets nothing; ``horizon_frames`` the longest video they were checked to
    sample in one piece, ``context_frames`` the frames each longer video's next chunk starts from.
    """
    horizon_frames, context_frames = check_chunking(horizon_frames, context_frames)
    if isinstance(temporal, LookBackUNet):
        temporal = temporal.temporal
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in temporal.site_state_dict().items()}
    metadata = {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "config": temporal.config.to_json(),
        "base_family": base_family,
        "training": json.dumps(training or {}, sort_keys=True),
    }
    if recommended_sampler:
        metadata["recommended_sampler"] = json.dumps(check_recommended_sampler(recommended_sampler))
    if horizon_frames is not None:
        metadata["horizon_frames"] = str(horizon_frames)
    if context_frames is not None:
        metadata["context_frames"] = str(context_frames)
    return save_safetensors(tensors, path, metadata)


def read_temporal_header(path: str | os.PathLike) -> TemporalHeader:
    """Read and check a file's metadata."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise TemporalWeightsError(path, problem)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise TemporalWeightsError(path, f"not a readable .safetensors file ({err})") from None
    if metadata.get("format") != FORMAT_TAG:
        raise TemporalWeightsError(
            path,
            f"not a look-back temporal weights file (format tag {metadata.get('format')!r}, "
            f"expected {FORMAT_TAG!r}); base-model checkpoints and other motion modules are not accepted here",
        )
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise TemporalWeightsError(
            path, f"format version {version!r} is not supported (this code reads up to {FORMAT_VERSION})"
        )
    # every field is checked here, where all front ends read it (lookback_core.metadata): types, ranges,
    # JSON depth; a problem names the file, the field and what it must be
    if "config" not in metadata:
        raise TemporalWeightsError(path, "it has no config metadata (the look-back modules' config)")
    try:
        config = LookBackConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as err:
        raise TemporalWeightsError(path, f"its config metadata is invalid ({err})") from None
    try:
        training = parse_json(metadata.get("training", "{}"), "it")
        if not isinstance(training, dict):
            raise ValueError(f"a JSON object was expected, got {type(training).__name__}")
        problems = training_fact_problems(training)
        if problems:
            raise ValueError("; ".join(problems))
    except ValueError as err:
        raise TemporalWeightsError(path, f"its training metadata is invalid ({err})") from None
    try:
        recommended = check_recommended_sampler(parse_json(metadata.get("recommended_sampler", "{}"), "it"))
    except ValueError as err:
        raise TemporalWeightsError(path, f"its recommended_sampler metadata is invalid ({err})") from None
    counts = [metadata.get(name) for name in ("horizon_frames", "context_frames")]
    try:
        horizon, context = check_chunking(*(v if v is None or not v.isdigit() else int(v) for v in counts))
    except ValueError as err:
        raise TemporalWeightsError(path, f"its chunking metadata is invalid ({err})") from None
    family = metadata.get("base_family", "")
    return TemporalHeader(
        config, training, family if isinstance(family, str) else shown(family), recommended, horizon, context
    )


def _check_family(path: Path, family: str) -> None:
    if family != BASE_FAMILY:
        raise TemporalWeightsError(
            path, f"it was trained for base family {family!r}, but this UNet is {BASE_FAMILY!r}"
        )


def _check_against_unet(path: Path, config: LookBackConfig, family: str, unet: nn.Module) -> None:
    _check_family(path, family)
    problems = site_problems(
        {s: config.channels.get(s) for s in config.sites}, site_channels(unet), "the file"
    )
    if problems:
        raise TemporalWeightsError(path, problems)


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the dtypes a weights file may hold


def _read_tensors(path: Path, temporal: TemporalModules) -> dict[str, torch.Tensor]:
    """The file's tensors, after their names, shapes and dtypes in the header match ``temporal``.

    ``temporal`` may live on the meta device: the header is checked before any tensor is read,
    so a file that claims more than it holds never makes anything allocate."""
    expected = {k: tuple(v.shape) for k, v in temporal.site_state_dict().items()}
    try:
        with safe_open(path, framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            stored = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
            problems = [f"missing tensor {k!r}" for k in expected if k not in stored]
            problems += [f"unexpected tensor {k!r}" for k in sorted(set(stored) - set(expected))]
            problems += [
                f"tensor {k!r} has shape {stored[k][0]}, expected {expected[k]}"
                for k in expected
                if k in stored and stored[k][0] != expected[k]
            ]
            problems += [
                f"tensor {k!r} is {dtype}; expected floating point ({', '.join(sorted(FLOAT_DTYPES))})"
                for k, (_, dtype) in stored.items()
                if k in expected and dtype not in FLOAT_DTYPES
            ]
            if problems:  # a TemporalWeightsError, which the except below lets through
                raise TemporalWeightsError(path, problems)
            tensors = {k: f.get_tensor(k) for k in expected}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise TemporalWeightsError(path, f"its tensors cannot be read ({err})") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise TemporalWeightsError(path, [f"tensor {k!r} holds NaN or infinite values" for k in bad])
    return tensors


def load_temporal_modules(
    path: str | os.PathLike, unet: nn.Module, *, latent_scale: float | None = None
) -> TemporalModules:
    """Build the modules described by the file, check them against ``unet`` (and the base's facts,
    :func:`base_problems`) and load them.

    The modules are made in the UNet's dtype and on its device (an fp64 UNet gets the file's
    fp64 values exactly), and only once the file's header matches them."""
    path = Path(path)
    header = read_temporal_header(path)
    _check_against_unet(path, header.config, header.base_family, unet)
    problems = base_problems(header, latent_scale=latent_scale, context_dim=unet.config.cross_attention_dim)
    if problems:
        raise TemporalWeightsError(path, problems)
    param = next(unet.parameters())
    return _build_modules(path, header.config, param.dtype, param.device)


def _build_modules(
    path: Path, config: LookBackConfig, dtype: torch.dtype, device: torch.device | str
) -> TemporalModules:
    with torch.device("meta"):
        temporal = TemporalModules(config)
    tensors = _read_tensors(path, temporal)  # before anything is allocated
    temporal = temporal.to(dtype=dtype).to_empty(device=device)
    temporal.load_site_state_dict(tensors)
    return temporal


def load_temporal_weights(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[TemporalModules, TemporalHeader]:
    """The modules of a weights file on the CPU in ``dtype``, with its header, for a UNet that is
    not at hand yet (a front end checks them against its own UNet's sites later)."""
    path = Path(path)
    header = read_temporal_header(path)
    _check_family(path, header.base_family)
    temporal = _build_modules(path, header.config, dtype, "cpu")
    return temporal.eval().requires_grad_(False), header


def base_problems(
    header: TemporalHeader, *, latent_scale: float | None, context_dim: int | None
) -> list[str]:
    """Why weights trained on another base do not fit this one: its latent scale (the VAE scaling
    factor, :mod:`lookback_core.latents`) or its text width. Facts the file does not record (weights
    written before they were recorded) and facts of this base that are not given are not checked."""
    problems = training_fact_problems(header.training)  # none for a header read from a file
    if problems:
        return problems
    trained_scale = header.training.get("latent_scale")
    if trained_scale is not None and latent_scale is not None and not same_scale(trained_scale, latent_scale):
        problems.append(
            f"it was trained on latents scaled by {trained_scale:.5g} (its base's VAE scaling factor); this "
            f"model's VAE scales by {latent_scale:.5g}"
        )
    trained_context = header.training.get("context_dim")
    if trained_context is not None and context_dim is not None and trained_context != context_dim:
        problems.append(
            f"it was trained with a text context of {trained_context} channels; this model's has {context_dim}"
        )
    return problems


def describe_base(header: TemporalHeader) -> str:
    """What the weights were trained on, in their own words (the facts their file records). Never
    raises, whatever the header holds: ComfyUI puts the ``str()`` of every input of a failed node
    into its error report, inside its own error handler."""
    facts = header.training if isinstance(header.training, dict) else {}

    def fact(name: str, words: str) -> str:
        value = facts[name]
        if name == "latent_scale" and is_number(value):
            return words.format(f"{value:.5g}")
        plain = isinstance(value, int) or (isinstance(value, str) and len(value) <= 200)
        return words.format(value if plain else shown(value))

    parts = [fact("base_checkpoint", "trained on {}") if "base_checkpoint" in facts else "base not recorded"]
    parts += [
        fact(name, words)
        for name, words in (("context_dim", "text context {}"), ("latent_scale", "latent scale {}"))
        if name in facts
    ]
    sites = getattr(header.config, "sites", ())
    parts.append(f"{len(sites) if isinstance(sites, (tuple, list)) else '?'} sites")
    if header.horizon_frames is not None:
        parts.append(f"checked for {shown(header.horizon_frames)} frames at once")
    return ", ".join(parts)


def load_lookback_unet(
    path: str | os.PathLike, unet: nn.Module, *, latent_scale: float | None = None
) -> LookBackUNet:
    """``unet`` with the look-back modules of the temporal weights file at ``path`` attached.

    ``latent_scale``: the scaling factor of the VAE the UNet is used with, checked against the one
    the weights were trained at."""
    return LookBackUNet(unet, load_temporal_modules(path, unet, latent_scale=latent_scale))
