"""Input checks shared by the commands: a problem with the user's input is a :class:`UsageError`,
printed without a traceback."""

from __future__ import annotations

from pathlib import Path

from lookback_core.atomic import check_writable, file_problem


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


def existing_file(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    problem = file_problem(path)
    if problem == "no such file":
        raise UsageError(f"{flag}: no such file: {path}")
    if problem:  # a folder, a FIFO ...: said so (a FIFO is never opened: that would wait)
        raise UsageError(f"{flag}: {path} {problem}")
    return path


def writable(flag: str, value: str, *, folder: bool = False) -> None:
    try:
        check_writable(Path(value).expanduser(), folder=folder)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None
