"""What files say about themselves, checked when it is read: one place for every front end.

A checkpoint's embedded model configs (:data:`lookback_core.sd15.EMBEDDED_CONFIGS_KEY`, which the
loaders build models from) and a look-back weights file's metadata (its module config, training
facts) come from files anyone can write. Before anything is built from them:

- JSON is read with a depth limit (:func:`parse_json`: nested deeper than :data:`MAX_JSON_DEPTH`
  is a named error, never Python's ``RecursionError``);
- every field the code reads has its type and range checked, with the ranges the architecture
  gives (group norms divide the channels they normalise, attention heads divide the widths, the
  UNet's input and output are the VAE's latent, bounded layer and timestep counts, finite positive
  scales and betas) (:func:`model_config_problems`,
  :func:`training_fact_problems`; the look-back module config in
  :class:`lookback_core.config.LookBackConfig`);
- the weights the configs describe are estimated (a lower bound) and must fit in what the file
  holds (:func:`size_problems`), so a small file cannot make a loader allocate gigabytes.

Problems are returned as ``"<part>.<field> must be <expected>, got <value>"``; the readers
(:mod:`lookback_core.sd15`, :mod:`lookback_core.weights`) put the file's name in front.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .rules import Rule, flag, is_whole, number, one_of, shown, whole

MAX_JSON_DEPTH = 64  # configs are 3 deep, training facts 4; safetensors headers 3
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest (brackets inside strings do not count), without
    parsing it: a text nested 100,000 deep is measured, not recursed into."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(text: str | bytes, what: str) -> Any:
    """``text`` parsed as JSON; ``ValueError`` naming ``what`` when it is not JSON or nests deeper
    than :data:`MAX_JSON_DEPTH` levels."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{what} is not UTF-8 text ({err})") from None
    if not isinstance(text, str):
        raise ValueError(f"{what} must be JSON text, got {type(text).__name__}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are read")
    try:
        return json.loads(text)
    except RecursionError:  # not reached after the depth check; kept so no parse ever raises it
        raise ValueError(f"{what} is JSON nested too deeply to read") from None
    except ValueError as err:
        raise ValueError(f"{what} is not valid JSON ({err})") from None


def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults a diffusers class gives the fields a config leaves out (its ``__init__``'s)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _defaults() -> dict[str, dict[str, Any]]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    return {
        "unet": init_defaults(UNet2DConditionModel),
        "vae": init_defaults(AutoencoderKL),
        "text_encoder": CLIPTextConfig().to_dict(),
        "scheduler": init_defaults(DDIMScheduler),
    }


# Bounds from the architecture, wide enough for any SD1.5-layout model (SD1.5's own values in brackets)
MAX_WIDTH = 8192  # channels of a block, widths of the text tower (1280, 768)
MAX_BLOCKS = 8  # resolution levels of the UNet and the VAE (4)
MAX_LAYERS = 16  # layers per block, transformer layers per attention (2, 1)
MAX_TEXT_LAYERS = 64  # (12)
MAX_TIMESTEPS = 10_000  # the noise schedule's training timesteps (1000)
SD15_VOCABULARY = 49408  # the SD1.5 tokenizer's: the text tower needs a row for each
SD15_TOKENS = 77  # the tokenizer's sequence length: the text tower needs a position for each
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers' get_activation

_CHANNELS = whole(1, 64)
_WIDTH = whole(1, MAX_WIDTH)
_LAYERS = whole(1, MAX_LAYERS)
_EPS = number(0, 1, above=True)

_UNET_RULES: dict[str, Rule] = {
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "cross_attention_dim": _WIDTH,
    "sample_size": whole(1, 4096),
    "norm_eps": _EPS,
    "act_fn": one_of(*ACTIVATIONS),
    "mid_block_type": one_of("UNetMidBlock2DCrossAttn", note="SD1.5's; its look-back site 'middle' is there"),
    "num_attention_heads": Rule(
        lambda v: v is None, "null (diffusers' UNet2DConditionModel reads the heads from attention_head_dim)"
    ),
    "conv_in_kernel": Rule(lambda v: is_whole(v) and 1 <= v <= 7 and v % 2, "an odd whole number in 1..7"),
    "conv_out_kernel": Rule(lambda v: is_whole(v) and 1 <= v <= 7 and v % 2, "an odd whole number in 1..7"),
    "flip_sin_to_cos": flag(),
    "center_input_sample": flag(),
    "use_linear_projection": flag(),
    "upcast_attention": flag(),
    "dual_cross_attention": flag(),
}
_VAE_RULES: dict[str, Rule] = {
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "latent_channels": _CHANNELS,
    "layers_per_block": _LAYERS,
    "sample_size": whole(1, 8192),
    "act_fn": one_of(*ACTIVATIONS),
    "scaling_factor": number(0, 1000, above=True, note="the latent scale"),
    "shift_factor": Rule(lambda v: v is None or math.isfinite(v), "null or a finite number"),
    "force_upcast": flag(),
    "use_quant_conv": flag(),
    "use_post_quant_conv": flag(),
    "mid_block_add_attention": flag(),
}
_TEXT_RULES: dict[str, Rule] = {
    "vocab_size": whole(SD15_VOCABULARY, 1_000_000, f"the SD1.5 tokenizer has {SD15_VOCABULARY} tokens"),
    "hidden_size": _WIDTH,
    "intermediate_size": whole(1, 4 * MAX_WIDTH),
    "num_attention_heads": whole(1, MAX_WIDTH),
    "num_hidden_layers": whole(1, MAX_TEXT_LAYERS),
    "max_position_embeddings": whole(SD15_TOKENS, 4096, f"the SD1.5 tokenizer reads {SD15_TOKENS} tokens"),
    "layer_norm_eps": _EPS,
    "projection_dim": _WIDTH,
    "eos_token_id": whole(0, 1_000_000),
}
_SCHEDULER_RULES: dict[str, Rule] = {
    "num_train_timesteps": whole(1, MAX_TIMESTEPS),
    "beta_start": number(0, 1, above=True),
    "beta_end": number(0, 1, above=True),
    "beta_schedule": one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": one_of("epsilon", "v_prediction"),
    "clip_sample": flag(),
    "set_alpha_to_one": flag(),
    "steps_offset": whole(0, MAX_TIMESTEPS - 1),
}


def _text_activation(value: Any) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(value, str) and value in ACT2FN


def _per_block(name: str, value: Any, blocks: int, rule: Rule) -> tuple[list[Any], list[str]]:
    """``value`` (one value, or a list with one per block) as a list of ``blocks`` values, and its problems."""
    values = value if isinstance(value, (list, tuple)) else [value] * blocks
    if len(values) != blocks:
        return [], [f"{name} must be one value or a list of {blocks} (one per block), got {shown(value)}"]
    problems = [p for v in values for p in [rule.problem(name, v)] if p]
    return list(values), problems[:1]


def _block_problems(
    part: str, config: Mapping[str, Any], down: tuple[str, ...], up: tuple[str, ...]
) -> tuple[list[int], list[str]]:
    """The widths of ``part``'s blocks and the problems of its block lists."""
    widths = config.get("block_out_channels")
    if (
        not isinstance(widths, (list, tuple))
        or not 1 <= len(widths) <= MAX_BLOCKS
        or not all(_WIDTH.accepts(w) for w in widths)
    ):
        return [], [
            f"{part}.block_out_channels must be a list of 1..{MAX_BLOCKS} whole numbers in 1..{MAX_WIDTH}, "
            f"got {shown(widths)}"
        ]
    problems = []
    for name, allowed in (("down_block_types", down), ("up_block_types", up)):
        types = config.get(name)
        if (
            not isinstance(types, (list, tuple))
            or len(types) != len(widths)
            or not all(isinstance(t, str) and t in allowed for t in types)
        ):
            problems.append(
                f"{part}.{name} must be a list of {len(widths)} (one per block) of {' or '.join(map(repr, allowed))}, "
                f"got {shown(types)}"
            )
    groups = config.get("norm_num_groups")
    if not _WIDTH.accepts(groups):
        problems.append(
            f"{part}.norm_num_groups must be a whole number in 1..{MAX_WIDTH}, got {shown(groups)}"
        )
    elif any(w % groups for w in widths):
        problems.append(
            f"{part}.norm_num_groups ({groups}) must divide every block's channels {list(widths)} (group norms)"
        )
    return list(widths), problems


def model_config_problems(configs: Mapping[str, Any]) -> list[str]:
    """What is wrong with the ``unet``, ``vae``, ``text_encoder`` and ``scheduler`` configs
    (diffusers/transformers dicts; a field left out takes the class's default), field by field."""
    defaults = _defaults()
    problems: list[str] = []
    parts = {}
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        config = configs.get(part)
        if not isinstance(config, Mapping):
            problems.append(f"{part} must be a JSON object (the {part} config), got {shown(config)}")
            continue
        parts[part] = {**defaults[part], **config}
    rules = {
        "unet": _UNET_RULES,
        "vae": _VAE_RULES,
        "text_encoder": _TEXT_RULES,
        "scheduler": _SCHEDULER_RULES,
    }
    for part, config in parts.items():
        problems += [
            p
            for field, rule in rules[part].items()
            for p in [rule.problem(f"{part}.{field}", config.get(field))]
            if p
        ]
    unet, vae, text, scheduler = (parts.get(p) for p in ("unet", "vae", "text_encoder", "scheduler"))
    if unet is not None:
        widths, found = _block_problems(
            "unet", unet, ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
        )
        problems += found
        if widths:
            for name, rule in (("layers_per_block", _LAYERS), ("transformer_layers_per_block", _LAYERS)):
                problems += _per_block(f"unet.{name}", unet.get(name), len(widths), rule)[1]
            heads, found = _per_block(
                "unet.attention_head_dim", unet.get("attention_head_dim"), len(widths), _WIDTH
            )
            problems += found
            if heads and not found and any(w % h for w, h in zip(widths, heads)):
                problems.append(
                    f"unet.attention_head_dim (the heads, {shown(unet.get('attention_head_dim'))}) must divide every "
                    f"block's channels {widths}"
                )
    if vae is not None:
        problems += _block_problems("vae", vae, ("DownEncoderBlock2D",), ("UpDecoderBlock2D",))[1]
    if text is not None:
        if not _text_activation(text.get("hidden_act")):
            problems.append(
                f"text_encoder.hidden_act must be one of transformers' activations, got {shown(text.get('hidden_act'))}"
            )
        hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
        if _WIDTH.accepts(hidden) and _WIDTH.accepts(heads) and hidden % heads:
            problems.append(
                f"text_encoder.num_attention_heads ({heads}) must divide text_encoder.hidden_size ({hidden})"
            )
    if unet is not None and vae is not None:
        latent = vae.get("latent_channels")
        for field in ("in_channels", "out_channels"):
            if _CHANNELS.accepts(latent) and _CHANNELS.accepts(unet.get(field)) and unet[field] != latent:
                problems.append(
                    f"unet.{field} ({unet[field]}) must be vae.latent_channels ({latent}): the UNet denoises the VAE's latents"
                )
    if scheduler is not None:
        problems += _schedule_problems(scheduler)
    return problems


def _schedule_problems(scheduler: Mapping[str, Any]) -> list[str]:
    problems = []
    start, end, steps = (scheduler.get(k) for k in ("beta_start", "beta_end", "num_train_timesteps"))
    linear = scheduler.get("beta_schedule") in ("linear", "scaled_linear")
    if linear and _EPS.accepts(start) and _EPS.accepts(end) and start >= end:
        problems.append(f"scheduler.beta_start ({start:g}) must be below scheduler.beta_end ({end:g})")
    betas = scheduler.get("trained_betas")
    if betas is not None and not (
        isinstance(betas, (list, tuple))
        and (not is_whole(steps) or len(betas) == steps)
        and all(_EPS.accepts(b) for b in betas)
    ):
        problems.append(
            f"scheduler.trained_betas must be null or a list of {shown(steps)} numbers in (0, 1], got {shown(betas)}"
        )
    offset = scheduler.get("steps_offset")
    if is_whole(steps) and is_whole(offset) and 1 <= steps <= MAX_TIMESTEPS and offset >= steps:
        problems.append(f"scheduler.steps_offset ({offset}) must be below num_train_timesteps ({steps})")
    return problems


def _layers(config: Mapping[str, Any], name: str, blocks: int) -> list[int]:
    value = config.get(name, 1)
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def weight_lower_bounds(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """At least how many weights each part's config describes (its convolutions, attention and
    embeddings), for configs without :func:`model_config_problems`."""
    defaults = _defaults()
    unet = {**defaults["unet"], **configs["unet"]}
    vae = {**defaults["vae"], **configs["vae"]}
    text = {**defaults["text_encoder"], **configs["text_encoder"]}
    counts = {}
    # UNet: conv_in, every resnet's 3x3 convs, every attention's projections and transformer layers
    # (self- and cross-attention, the feed-forward)
    widths = list(unet["block_out_channels"])
    layers = _layers(unet, "layers_per_block", len(widths))
    transformers = _layers(unet, "transformer_layers_per_block", len(widths))
    context = unet["cross_attention_dim"]

    def attention(c: int, deep: int, kind: str) -> int:
        return 2 * c * c + deep * (18 * c * c + 2 * c * context) if kind.startswith("CrossAttn") else 0

    total, previous = 9 * unet["in_channels"] * widths[0], widths[0]
    for c, count, deep, kind in zip(widths, layers, transformers, unet["down_block_types"]):
        for j in range(count):
            total += 9 * (previous if j == 0 else c) * c + 9 * c * c + attention(c, deep, kind)
        previous = c
    total += 2 * 18 * widths[-1] ** 2 + attention(
        widths[-1], transformers[-1], "CrossAttn"
    )  # the middle block
    for c, count, deep, kind in zip(widths[::-1], layers[::-1], transformers[::-1], unet["up_block_types"]):
        for j in range(count + 1):
            total += 9 * c * c * (1 if j == 0 else 2) + attention(c, deep, kind)
    counts["unet"] = total
    # VAE: the encoder's and the decoder's resnets (and their middle blocks' two)
    widths, count = list(vae["block_out_channels"]), vae["layers_per_block"]
    total, previous = 9 * vae["in_channels"] * widths[0], widths[0]
    for c in widths:
        total += sum(9 * (previous if j == 0 else c) * c + 9 * c * c for j in range(count))
        previous = c
    total += 2 * 2 * 18 * widths[-1] ** 2
    total += sum(9 * c * c * (2 * (count + 1) - 1) for c in widths)
    counts["vae"] = total
    # text tower: token and position embeddings, each layer's attention and MLP
    hidden = text["hidden_size"]
    counts["text_encoder"] = (text["vocab_size"] + text["max_position_embeddings"]) * hidden + text[
        "num_hidden_layers"
    ] * (4 * hidden * hidden + 2 * hidden * text["intermediate_size"])
    return counts


def size_problems(configs: Mapping[str, Mapping[str, Any]], held: Mapping[str, int]) -> list[str]:
    """Parts whose configs describe more weights than the file holds for them (``held``: part ->
    tensor elements): building them would allocate what the file cannot fill."""
    needed = weight_lower_bounds(configs)
    return [
        f"the {part} config describes at least {needed[part]:,} weights, the file holds {held.get(part, 0):,} "
        "for it: the config does not fit the file"
        for part in ("unet", "vae", "text_encoder")
        if needed[part] > held.get(part, 0)
    ]


# Training facts a front end reads from a weights file (lookback_core.weights.base_problems and the
# descriptions); others are kept as written.
TRAINING_FACT_RULES: dict[str, Rule] = {
    "latent_scale": number(0, 1000, above=True, note="the VAE scaling factor the weights were trained at"),
    "context_dim": whole(1, MAX_WIDTH, note="the text context width they were trained with"),
    "base_checkpoint": Rule(lambda v: isinstance(v, str), "a file name"),
    "frames": whole(1, 1_000_000),
    "stride": whole(1, 1_000_000),
    "resolution": whole(1, 1_000_000),
    "steps": whole(0, 10**12),
}


def training_fact_problems(facts: Mapping[str, Any]) -> list[str]:
    """What is wrong with the training facts a front end reads (the others are not checked)."""
    return [
        p
        for name, rule in TRAINING_FACT_RULES.items()
        if name in facts
        for p in [rule.problem(f"training.{name}", facts[name])]
        if p
    ]
