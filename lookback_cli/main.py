"""Command line: ``python -m lookback_cli generate|info|demo|toyworld ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lookback_core.atomic import describe_os_error, sigterm_as_exit

from .generate import add_generate_arguments, add_info_command
from .toy_commands import add_toy_commands
from .usage import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lookback_cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(commands.add_parser("generate", help="turn one image into a video"))
    add_info_command(commands)
    add_toy_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lookback_core.checkpoint_file import CheckpointError
    from lookback_core.video_io import VideoReadError
    from lookback_core.weights import TemporalWeightsError

    try:
        with sigterm_as_exit():
            return args.func(args)
    except (UsageError, CheckpointError, TemporalWeightsError, VideoReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, named (every file was written atomically)
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 2
