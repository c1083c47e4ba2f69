"""What a number or a setting must be: one table that every front end reads.

A :class:`Rule` is a test and the words for what it expects; ``Rule.problem`` never raises,
whatever the value (a string where a number was expected, NaN, a list from a crafted file).

- :data:`SAMPLER_SETTINGS`: the sampler's settings (type, default, bounds, help), from which the
  sampler's checks (:func:`lookback_core.sampler.check_setting`), the command line's flags
  (``generate``, ``toyworld eval``), the ComfyUI nodes' inputs and the settings a weights file may
  recommend all come;
- :data:`NUMBERS`: quantities more than one front end takes (frames sampled at once, the look-back
  depth, learning rates, the training objective's weights): the trainer's flags, the toy recipe and
  the nodes bound them here, so a number refused by one is refused by all. The upper bounds stop a
  typo or a crafted file from exhausting memory or overflowing float32 before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

_SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """A short repr of ``value`` for messages (never raises, however odd the value)."""
    try:
        text = repr(value)
    except Exception:  # a crafted object's repr: its type is enough
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class Rule(NamedTuple):
    """A test and what it expects, in words ("a whole number in 1..1000"); unpacks as ``(test, expected)``."""

    test: Callable[[Any], bool]
    expected: str

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, OverflowError, AttributeError):
            return False

    def problem(self, name: str, value: Any) -> str | None:
        """``"<name> must be <expected>, got <value>"``, or ``None`` when ``value`` is valid."""
        return None if self.accepts(value) else f"{name} must be {self.expected}, got {shown(value)}"


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def whole(low: int, high: int | None = None, note: str = "") -> Rule:
    """A whole number in ``low..high`` (``high`` None: no upper bound)."""
    words = f"a whole number >= {low}" if high is None else f"a whole number in {low}..{high}"
    return Rule(lambda v: is_whole(v) and v >= low and (high is None or v <= high), _note(words, note))


def number(low: float, high: float | None = None, *, above: bool = False, note: str = "") -> Rule:
    """A finite number from ``low`` (excluded when ``above``) to ``high`` (None: no bound)."""
    if high is None:
        words = f"a finite number {'>' if above else '>='} {low:g}"
    else:
        words = f"a number in ({low:g}, {high:g}]" if above else f"a number in {low:g}..{high:g}"
    return Rule(
        lambda v: is_number(v) and (v > low if above else v >= low) and (high is None or v <= high),
        _note(words, note),
    )


def one_of(*values: Any, note: str = "") -> Rule:
    words = " or ".join(repr(v) for v in values) if len(values) <= 2 else f"one of {list(values)}"
    return Rule(lambda v: isinstance(v, (str, bool, type(None))) and v in values, _note(words, note))


def flag() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")


# Frames one latent video holds at once: a video sampled in one piece, a chunk of a long video
# (Look-Back Image To Video, Extend Video, the trainer's validation videos). Longer videos are
# sampled chunk by chunk (lookback_core.long_video), whose memory does not grow with the length.
MAX_FRAMES_AT_ONCE = 4096
MAX_LOOKBACK_DEPTH = 64  # the look-back conv reads d frames: d*n input channels at every site

NUMBERS: dict[str, Rule] = {
    "frames_at_once": whole(
        2,
        MAX_FRAMES_AT_ONCE,
        "frames in one latent video, the start image included; longer videos go in chunks",
    ),
    "new_frames": whole(1, MAX_FRAMES_AT_ONCE - 1, "new frames of one chunk, after its context"),
    "context_frames": whole(1, MAX_FRAMES_AT_ONCE - 1),
    "lookback_depth": whole(1, MAX_LOOKBACK_DEPTH),
    "learning_rate": number(0, 1, above=True),
    "batch_size": whole(1, 1024),
    "training_seed": whole(0, 2**32 - 1, "numpy's seeds"),
    # how much more often the biased timesteps are drawn: float32 weights of 1000 timesteps neither
    # overflow (1e39 did, at step 1) nor all round to zero (1e-50 with portion 1 did)
    "timestep_bias_multiplier": number(1e-6, 1e6, note="1: no bias"),
    "timestep_bias_portion": number(0, 1, above=True),
    # 1 + weight x (a pixel's change / the clip's mean change): 1e39 overflowed float32 (a NaN loss)
    "motion_loss_weight": number(0, 1e4, note="0: the plain MSE"),
    "eval_clips": whole(1, 10_000),
}


def check_number(name: str, value: Any, shown_as: str | None = None) -> None:
    """Raise ``ValueError`` naming ``shown_as`` (default ``name``) unless ``value`` meets ``NUMBERS[name]``."""
    problem = NUMBERS[name].problem(shown_as or name, value)
    if problem:
        raise ValueError(problem)


COLOUR_MATCHES = ("off", "first_frame")
FIRST_FRAMES = ("clean", "noised")
CFG_MAX = 100.0  # KSampler's largest; a scale such as 1e39 overflows float32 guidance into NaN frames


@dataclass(frozen=True)
class Setting:
    """One sampler setting: its type, default, bounds (or choices), help text and command-line flag."""

    name: str
    kind: type
    default: Any
    help: str
    flag: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    note: str = ""
    words: str = ""  # what it must be, where the bounds say it badly

    @property
    def rule(self) -> Rule:
        if self.choices:
            rule = one_of(*self.choices, note=self.note)
        elif self.kind is int:
            rule = whole(int(self.low), None if self.high is None else int(self.high), self.note)
        else:
            rule = number(self.low, self.high, note=self.note)
        return Rule(rule.test, self.words) if self.words else rule

    def comfy_input(self, **options: Any) -> tuple:
        """The setting as a ComfyUI node input (``options`` override the table's, e.g. a tooltip)."""
        if self.choices:
            return (
                list(options.pop("choices", self.choices)),
                {"default": self.default, "tooltip": self.help, **options},
            )
        spec = {"default": self.default, "min": self.low, "max": self.high, "tooltip": self.help}
        if self.kind is float:
            spec["step"] = 0.01
        return ("INT" if self.kind is int else "FLOAT", {**spec, **options})


SAMPLER_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("steps", int, 25, "DDIM steps", "--steps", 1, 1000, note="the schedule has 1000 timesteps"),
        Setting(
            "cfg_scale", float, 7.5, "classifier-free guidance scale; 1 disables it", "--cfg", 0.0, CFG_MAX,
            note="1 disables guidance",
        ),
        Setting(
            "eta", float, 0.0, "DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like", "--eta", 0.0, 1.0,
            note="0: DDIM, 1: DDPM-like",
        ),
        Setting("seed", int, 0, "the seed of the noise (a seed gives the same video as KSampler's)", "--seed",
                0, 2**64 - 1, words="a whole number in 0..2^64-1"),
        Setting(
            "first_frame", str, "clean",
            "frame 0 as the UNet sees it: clean (hybrid initialisation) or noised to each step (the paper's "
            "add-noise strategy, for weights trained with --objective ddpm)",
            "--first-frame", choices=FIRST_FRAMES,
            note="'clean': hybrid initialisation; 'noised': the paper's add-noise strategy",
        ),
        Setting(
            "colour_match", str, "off",
            "first_frame: set each new frame's latent colour statistics (per channel mean and spread) to the "
            "first frame's, against colour drift; for scenes whose colours stay put",
            "--colour-match", choices=COLOUR_MATCHES,
            note="first_frame: each new frame's latent colour statistics set to the first pinned frame's",
        ),
    )
}  # fmt: skip
