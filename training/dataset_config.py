"""What the trainer learns from: one or more datasets, from a TOML file (``--dataset_config``) or
from the data flags (``--train_data_dir`` and the rest: one dataset, square, as before).

A dataset config::

    [general]              # defaults for every dataset below
    resolution = 256       # or a list: [256, 384]; aspect-ratio buckets around each
    num_frames = [16, 32]  # frame-count buckets: a video gives a clip of each count it holds
    frame_stride = 4

    [[datasets]]
    path = "videos/phone"  # a folder of videos (+ captions in same-name .txt files) or frame folders
    repeats = 2            # its clips count twice per epoch

    [[datasets]]
    path = "webvid/videos" # a WebVid root: the videos are <path>/<page_dir>/<videoid><video_extension>
    csv = "webvid/results_2M_train.csv"
    num_frames = 32

Every key of ``[general]`` may be set per dataset; :data:`KEYS` lists them with what they mean.
Paths are read as on the command line (relative to the folder you run from). ``buckets = false``
trains square centre crops at each resolution instead of aspect-ratio buckets.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lookback_core.atomic import file_problem
from training.run_config import read_toml

DATASETS_NAME = "dataset_config.toml"  # the resolved datasets, written into the output folder
# key -> what it is, as said in errors and docs
KEYS = {
    "path": "a folder of videos or frame folders (the root of a CSV's videos)",
    "csv": "a WebVid-style CSV (columns videoid, page_dir and the caption column)",
    "caption_column": "the CSV's caption column (default name)",
    "caption_extension": "the caption files' extension beside each video (default .txt)",
    "video_extension": "a CSV's video files' extension (default .mp4)",
    "resolution": "the training size(s): a whole number or a list of them",
    "num_frames": "frames per clip, including the conditioning frame: a whole number or a list",
    "frame_stride": "take every N-th frame",
    "reference_fps": "if set, frame_stride is meant at this fps and is scaled to each video's fps",
    "repeats": "how many times the dataset's clips count per epoch",
    "buckets": "aspect-ratio buckets (true) or square centre crops (false)",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset and how its clips are made (see the module's text)."""

    path: str
    csv: str | None = None
    caption_column: str = "name"
    caption_extension: str = ".txt"
    video_extension: str = ".mp4"
    resolution: tuple[int, ...] = (256,)
    num_frames: tuple[int, ...] = (32,)
    frame_stride: int = 4
    reference_fps: float | None = None
    repeats: int = 1
    buckets: bool = True

    def recorded(self) -> dict[str, Any]:
        """As the weights record it: the folder and CSV by name only."""
        facts = asdict(self) | {"path": Path(self.path).name, "csv": self.csv and Path(self.csv).name}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in facts.items()}


def _whole_numbers(value: Any, named: str, low: int) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise ValueError(f"{named} must be a whole number {low} or more, or a list of them; got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{named} lists a value twice: {value!r}")
    return tuple(values)


def _checked(settings: dict[str, Any], where: str) -> DatasetSpec:
    """A dataset's settings (general ones merged in) as a spec; raises ValueError naming the key."""

    def named(key: str) -> str:
        return f"{where}: {key}"

    if "path" not in settings:
        raise ValueError(f"{where}: needs a path ({KEYS['path']})")
    spec: dict[str, Any] = {}
    for key, value in settings.items():
        if key in ("path", "csv", "caption_column", "caption_extension", "video_extension"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{named(key)} must be a non-empty string, got {value!r}")
            spec[key] = value
        elif key in ("resolution", "num_frames"):
            spec[key] = _whole_numbers(value, named(key), 64 if key == "resolution" else 2)
        elif key in ("frame_stride", "repeats"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{named(key)} must be a whole number 1 or more, got {value!r}")
            spec[key] = value
        elif key == "reference_fps":
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{named(key)} must be a number above 0, got {value!r}")
            spec[key] = float(value)
        elif key == "buckets":
            if not isinstance(value, bool):
                raise ValueError(f"{named(key)} must be true or false, got {value!r}")
            spec[key] = value
    if spec.get("buckets", True) is False and any(r % 8 for r in spec.get("resolution", ())):
        raise ValueError(
            f"{named('resolution')} must be multiples of 8 for square crops, got {settings['resolution']}"
        )
    if not Path(spec["path"]).is_dir():
        raise ValueError(f"{named('path')}: no such folder: {spec['path']}")
    problem = file_problem(spec["csv"]) if "csv" in spec else None
    if problem:
        raise ValueError(
            f"{named('csv')}: {spec['csv']} {'does not exist' if problem == 'no such file' else problem}"
        )
    for key in ("caption_extension", "video_extension"):
        if key in spec and not spec[key].startswith("."):
            raise ValueError(f"{named(key)} must start with a dot, got {spec[key]!r}")
    return DatasetSpec(**spec)


def _unknown(table: dict[str, Any], where: str) -> None:
    for key in table:
        if key not in KEYS:
            near = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(
                f"{where}: {key} is not a dataset setting{hint}; the settings: {', '.join(KEYS)}"
            )


def read_dataset_config(path: str) -> list[DatasetSpec]:
    """The datasets of the TOML file at ``path``; raises ValueError naming the file, the dataset and
    the key that is wrong (before any work)."""
    table = read_toml(path)
    extra = set(table) - {"general", "datasets"}
    if extra:
        raise ValueError(
            f"{path}: {', '.join(sorted(extra))}: expected only [general] and [[datasets]] tables"
        )
    general, datasets = table.get("general", {}), table.get("datasets", [])
    if not isinstance(general, dict):
        raise ValueError(f"{path}: general must be a table ([general])")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise ValueError(f"{path}: needs at least one [[datasets]] table")
    _unknown(general, f"{path} [general]")
    if "path" in general or "csv" in general:
        raise ValueError(f"{path} [general]: path and csv belong to each [[datasets]]")
    specs = []
    for number, dataset in enumerate(datasets, 1):
        where = f"{path} [[datasets]] #{number}"
        _unknown(dataset, where)
        specs.append(_checked(general | dataset, where))
    return specs


def resolved_toml(specs: list[DatasetSpec]) -> str:
    """The datasets as a dataset config with every setting written out (what the run resolved)."""
    import tomli_w  # the trainer's own package (requirements-train.txt)

    rows = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items() if v is not None}
        for spec in specs
    ]
    heading = "# The datasets this run resolved from its --dataset_config (every setting written out).\n"
    return heading + tomli_w.dumps({"datasets": rows})


def from_flags(args: argparse.Namespace) -> list[DatasetSpec]:
    """The one square dataset the data flags describe."""
    return [
        DatasetSpec(
            path=args.train_data_dir, csv=args.csv, video_extension=args.video_extension,
            resolution=(args.resolution,), num_frames=(args.num_frames,), frame_stride=args.frame_stride,
            reference_fps=args.reference_fps, buckets=False,
        )
    ]  # fmt: skip
