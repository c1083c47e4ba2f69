"""Configuration of the look-back temporal modules.

Symbols of the paper ("Implicit Semi-Auto-Regressive Image-to-Video Diffusion"), used throughout
``lookback_core``:

- ``f``: number of frames in a clip; frame 0 is the given image.
- ``d`` (``depth``): look-back depth. Frame ``i`` is updated from its own input and the
  already-updated outputs of the ``d - 1`` frames before it.
- ``k`` (``kernel``): spatial kernel of the look-back Conv2d (``d*n -> n``, ``k x k``).
- ``n``: channels of the UNet hidden state at a site.
- anchor (``first_frame_anchor``, beyond the paper): a ``k x k`` Conv2d ``n -> n`` from frame 0's
  input at the site, added to every later frame's look-back conv, so each frame is one hop from
  the given image instead of ``i`` hops along the chain.
- adapter: a depth-wise 3D conv (``adapter_kernel`` in time, height and width) after the
  look-back conv and the 1x1 channel mix.
- temporal attention (``temporal_attention``, off in every preset): an AnimateDiff-style motion
  module after those, the alternative the paper argues against, for the ablation.

The config is saved in the header of every temporal weights file, so a file fully describes the
modules it holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace

from .metadata import parse_json
from .rules import NUMBERS, Rule, flag, is_whole, one_of, shown, whole

FORMAT_VERSION = 1

# Site names in the original LDM layout of SD1.5 (see sites.py for the mapping onto diffusers).
SD15_INPUT_SITES = tuple(f"input.{k}" for k in (1, 2, 4, 5, 7, 8, 10, 11))
SD15_OUTPUT_SITES = tuple(f"output.{k}" for k in range(12))
SD15_SITES = SD15_INPUT_SITES + ("middle",) + SD15_OUTPUT_SITES


MAX_KERNEL = 15
MAX_SITES = 256
_SITE_NAME = re.compile(r"middle|(input|output)\.\d{1,3}")
_ODD_KERNEL = Rule(
    lambda v: is_whole(v) and 1 <= v <= MAX_KERNEL and v % 2 == 1, f"an odd whole number in 1..{MAX_KERNEL}"
)
_CHANNELS = whole(1, 16384, "channels of a UNet layer")
_FIELD_RULES: dict[str, Rule] = {
    "depth": NUMBERS["lookback_depth"],
    "kernel": _ODD_KERNEL,
    "adapter_kernel": _ODD_KERNEL,
    "padding_mode": one_of("zeros", "reflect", "replicate"),
    "temporal_attention": one_of("off", "full", "causal"),
    "attention_heads": whole(1, 64),
    **{
        name: flag()
        for name in ("channel_mix", "adapter", "lookback", "causal_adapter", "first_frame_anchor")
    },
}


@dataclass(frozen=True)
class LookBackConfig:
    """Hyper-parameters of the look-back modules and the sites that carry one.

    ``channels`` maps each site to its channel count ``n``; it is filled from the UNet by
    :func:`lookback_core.sites.site_channels` when the modules are created, and checked against
    the UNet when weights are loaded.
    """

    depth: int = 5
    kernel: int = 5
    adapter_kernel: int = 3
    sites: tuple[str, ...] = SD15_SITES
    channels: dict[str, int] = field(default_factory=dict)
    padding_mode: str = "zeros"
    channel_mix: bool = True
    adapter: bool = True
    lookback: bool = True  # False: no look-back conv (the adapter alone is the paper's "normal 3D conv")
    causal_adapter: bool = False  # True: the adapter pads only past frames, so no site sees ahead
    first_frame_anchor: bool = False  # True: the look-back conv of frame i >= 1 also reads frame 0's input
    # an AnimateDiff-style motion module at each site too, after the rest (the ablation's alternative to
    # the look-back: lookback_core.temporal_attention): "off", "full" or "causal" (frames see the past only)
    temporal_attention: str = "off"
    attention_heads: int = 8

    def __post_init__(self) -> None:
        # types and bounds first (a file's config is anyone's JSON): lookback_core.rules
        if isinstance(self.sites, str) or not isinstance(self.sites, (list, tuple)):
            raise ValueError(
                f"sites must be a list of site names (e.g. ['middle', 'output.0']), got {shown(self.sites)}"
            )
        problems = [
            p for name, rule in _FIELD_RULES.items() for p in [rule.problem(name, getattr(self, name))] if p
        ]
        if len(self.sites) > MAX_SITES or not all(
            isinstance(s, str) and _SITE_NAME.fullmatch(s) for s in self.sites
        ):
            problems.append(
                f"sites must be at most {MAX_SITES} site names ('input.K', 'middle', 'output.K'), got {shown(self.sites)}"
            )
        channels = self.channels
        if not isinstance(channels, dict) or not all(
            isinstance(k, str) and _CHANNELS.accepts(v) for k, v in channels.items()
        ):
            problems.append(f"channels must map site names to {_CHANNELS.expected}, got {shown(channels)}")
        if problems:
            raise ValueError("; ".join(problems))
        if not self.sites:
            raise ValueError("a look-back config needs at least one site")
        if self.first_frame_anchor and not self.lookback:
            raise ValueError("first_frame_anchor is part of the look-back conv; it needs lookback")
        if not (self.lookback or self.channel_mix or self.adapter or self.temporal_attention != "off"):
            raise ValueError(
                "a look-back config needs at least one of lookback, channel_mix, adapter and temporal_attention"
            )
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"duplicate sites in {self.sites}")
        object.__setattr__(self, "sites", tuple(self.sites))

    def with_channels(self, channels: dict[str, int]) -> LookBackConfig:
        """Return a copy whose ``channels`` holds the channel count of every configured site."""
        from .sites import site_problems

        problems = site_problems(dict.fromkeys(self.sites), channels)
        if problems:
            raise ValueError("; ".join(problems))
        return replace(self, channels={s: int(channels[s]) for s in self.sites})

    def to_json(self) -> str:
        data = asdict(self)
        data["sites"] = list(self.sites)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LookBackConfig:
        """The config a file records; ``ValueError`` names each field that is not what it must be."""
        data = parse_json(text, "the config")
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a JSON object, got {shown(data)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown look-back config field(s) {unknown}")
        data.setdefault("sites", list(SD15_SITES))
        return cls(**data)


PRESETS: dict[str, LookBackConfig] = {
    # The paper's figures: d=5, 5x5 look-back conv, 3x3x3 adapter after all 21 layers.
    "paper": LookBackConfig(depth=5, kernel=5),
    # Same sites, d=3 and 3x3: about a fifth of the paper preset's cost.
    "light": LookBackConfig(depth=3, kernel=3),
    # d=3, 3x3 only on the middle block and the decoder (13 sites).
    "light-decoder": LookBackConfig(depth=3, kernel=3, sites=("middle",) + SD15_OUTPUT_SITES),
}


def preset(name: str) -> LookBackConfig:
    """Return the named preset (``paper``, ``light``, ``light-decoder``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown look-back preset {name!r}; choose one of {sorted(PRESETS)}") from None
