"""A training run described by a TOML file (``--config run.toml``) instead of a long command line.

Every trainer flag can be a key of the file, by its name without the dashes, either at the top
level or in the table of its group (``[model]``, ``[data]``, ``[optimisation]``, ``[output]``: the
groups of ``python training/train.py --help``)::

    [model]
    pretrained_model = "models/v1-5-pruned-emaonly.safetensors"
    preset = "light"

    [optimisation]
    learning_rate = 1e-4
    train_backbone = true

Flags given on the command line override the file. Paths are taken as on the command line
(relative to the working folder). A switch (``train_backbone``) is ``true`` or ``false``; a
flag that may be repeated (``validation_image``) takes a list; a setting left unset is left out
of the file.

The trainer writes the configuration it resolved (file, command line and defaults) into its
output folder as :data:`RESOLVED_NAME`, which reruns the run with ``--config``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookback_core.atomic import file_problem

RESOLVED_NAME = "run_config.toml"
CONFIG_FLAG = "--config"
# settings that name files or folders: the weights record them by name only (no folder of yours
# travels in a shared weights file)
PATH_SETTINGS = (
    "pretrained_model", "config_dir", "init_lookback_weights", "dataset_config", "train_data_dir", "csv", "cache_dir",
    "output_dir", "validation_image", "isim_clip_model", "resume_from_checkpoint",
)  # fmt: skip


def _options(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.Action]]:
    """Every flag the file may set: its key -> (its group's title, its action)."""
    found = {}
    for group in parser._action_groups:  # argparse keeps no public list of its groups
        for action in group._group_actions:
            if action.option_strings and action.dest not in ("help", "config"):
                found[action.dest] = (group.title, action)
    return found


def _expected_type(action: argparse.Action) -> tuple[tuple[type, ...], str]:
    """The TOML types a flag's value may have, and how to say so."""
    if isinstance(action, argparse._StoreTrueAction):
        return (bool,), "true or false"
    if action.type is int:
        return (int,), "a whole number"
    if action.type is float:
        return (int, float), "a number"
    return (str,), "a string"


def _flatten(table: dict[str, Any], options: dict, where: str) -> dict[str, Any]:
    """The file's settings, its group tables opened; raises ValueError naming a key that is unknown,
    in another group's table, or set twice."""
    groups = {title for title, _ in options.values()}
    settings: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in groups:
                raise ValueError(
                    f"{where}: [{key}] is not a group of the trainer's flags (groups: {', '.join(sorted(groups))})"
                )
            for inner, inner_value in value.items():
                if inner in options and options[inner][0] != key:
                    raise ValueError(f"{where}: {inner} belongs in [{options[inner][0]}], not [{key}]")
                if inner in settings:
                    raise ValueError(f"{where}: {inner} is set twice")
                settings[inner] = (inner_value, f"[{key}] {inner}")
        else:
            if key in settings:
                raise ValueError(f"{where}: {key} is set twice")
            settings[key] = (value, key)
    for key, (_, named) in settings.items():
        if key not in options:
            near = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"{where}: {named} is not a flag of the trainer{hint}")
    return settings


def read_toml(path: str) -> dict[str, Any]:
    """The TOML file at ``path`` as a table; raises ValueError naming the file when it is missing, not
    a file, not UTF-8 or not valid TOML."""
    problem = file_problem(path)
    if problem:
        raise ValueError(f"no such file: {path}" if problem == "no such file" else f"{path} {problem}")
    # imported here: training.args (and so this module) is imported where only requirements.txt is
    # installed (toyworld.base_model), without the trainer's own packages
    tomllib = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None


def config_arguments(path: str, parser: argparse.ArgumentParser, given: set[str] = frozenset()) -> list[str]:
    """The command-line arguments the TOML file at ``path`` stands for, less the flags ``given`` on
    the command line (by their names without the dashes: those override the file, a repeatable
    flag's values included); raises ValueError naming the file and the key that is wrong."""
    table = read_toml(path)
    options = _options(parser)
    arguments: list[str] = []
    for key, (value, named) in _flatten(table, options, path).items():
        if key in given:
            continue
        action = options[key][1]
        flag = action.option_strings[0]
        if isinstance(action, argparse._AppendAction):  # a flag given once per value: a list of them
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"{path}: {named} must be a string or a list of strings, got {value!r}")
            arguments += [token for v in values for token in (flag, v)]
            continue
        types, expected = _expected_type(action)
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise ValueError(f"{path}: {named} must be {expected}, got {value!r}")
        if action.choices is not None and value not in action.choices:
            raise ValueError(
                f"{path}: {named} must be one of {', '.join(map(str, action.choices))}, got {value!r}"
            )
        if isinstance(value, bool):
            arguments += [flag] if value else []
        else:
            arguments += [flag, str(value)]
    return arguments


def expand_config(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's settings, ahead of the other
    arguments (which override them); exits through ``parser.error`` on a bad file."""
    argv = list(argv)
    places = [i for i, a in enumerate(argv) if a == CONFIG_FLAG or a.startswith(CONFIG_FLAG + "=")]
    if not places:
        return argv
    if len(places) > 1:
        parser.error(f"{CONFIG_FLAG} is given {len(places)} times; give one file")
    i = places[0]
    if "=" in argv[i]:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1 :]
    elif i + 1 < len(argv):
        path, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    else:
        parser.error(f"{CONFIG_FLAG} needs a TOML file")
    actions = parser._option_string_actions  # argparse keeps no public map of its flags
    given = {actions[a.split("=", 1)[0]].dest for a in rest if a.split("=", 1)[0] in actions}
    try:
        return config_arguments(path, parser, given) + rest
    except ValueError as err:
        parser.error(f"{CONFIG_FLAG}: {err}")


def resolved_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """Every set flag of the run, by group: what :func:`resolved_toml` writes."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, (group, _) in _options(parser).items():
        value = getattr(args, key, None)
        if value is not None:
            grouped.setdefault(group, {})[key] = value
    return grouped


def recorded_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run's settings as the weights record them: flat, with paths reduced to their names."""
    flat = {k: v for group in resolved_settings(args, parser).values() for k, v in group.items()}

    def name(value: Any) -> Any:
        return [Path(v).name for v in value] if isinstance(value, list) else Path(value).name

    return {k: name(v) if k in PATH_SETTINGS else v for k, v in flat.items()}


def resolved_toml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The run's configuration as a TOML file that reruns it with ``--config``."""
    heading = (
        "# The configuration this run resolved from its --config file, its command line and the defaults:\n"
        "# python training/train.py --config <this file> runs it again.\n"
    )
    import tomli_w  # the trainer's own package (requirements-train.txt): see config_arguments

    return heading + tomli_w.dumps(resolved_settings(args, parser))
