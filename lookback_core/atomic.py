"""Files that are never seen half-written: write to a hidden temporary name, then rename.

The temporary file is ``.<name>.<pid>-<random>.part`` beside the target. A writer that is killed
outright (SIGKILL, power loss) cannot remove its own; the next write to the same target removes
every such leftover whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors.torch import save_file


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def _writer_alive(partial: Path) -> bool:
    """Whether the process named in a temporary file's name still runs (names without one: no)."""
    pid = partial.name.rsplit(".", 2)[-2].partition("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_dead_writers(partials: Iterable[Path]) -> list[Path]:
    stale = [p for p in partials if p.is_file() and not _writer_alive(p)]
    for partial in stale:
        partial.unlink(missing_ok=True)
    return stale


def remove_stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of earlier writes to ``path`` whose writer is gone; returns them."""
    path = Path(path)
    return _remove_dead_writers(path.parent.glob(f".{glob.escape(path.name)}.*.part"))


def remove_stale_partials_under(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove every temporary file under ``folder`` (recursively) whose writer is gone; returns them."""
    folder = Path(folder)
    return _remove_dead_writers(folder.rglob(".*.part")) if folder.is_dir() else []


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    Missing parent folders are created, and leftovers of killed earlier writes removed. If the
    block fails, the temporary file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    partial = _partial_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def save_safetensors(
    tensors: dict, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as partial:
        save_file(tensors, partial, metadata=metadata or None)
    return Path(path)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit(143)`` (in the main thread; elsewhere nothing
    changes), so writes in flight remove their temporary files on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_writable(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """Check, before any work, that a file (``folder``: a folder) can be written at ``path``.

    Raises ``ValueError`` naming the problem: a folder where a file is wanted (or a file where a
    folder is), a name longer than the file system allows, a parent that is a file, or a folder
    that cannot be written to (tried with a probe file, so read-only and pseudo file systems are
    found too)."""
    path = Path(path).absolute()
    limit = os.pathconf(path.anchor, "PC_NAME_MAX")  # before any look at the path, which would fail
    long = [part for part in path.parts if len(os.fsencode(part)) > limit]
    if long:
        raise ValueError(f"cannot write '{path}': the name '{long[0][:40]}...' is longer than {limit} bytes")
    if path.is_dir() and not folder:
        raise ValueError(f"path '{path}' is a folder, not a file")
    if path.exists() and not path.is_dir() and folder:
        raise ValueError(f"'{path}' is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and not folder:  # replacing a file: its folder must take a new one
        existing = path.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write '{path}': '{existing}' is a file, not a folder")
    probe = existing / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"cannot write '{path}': the folder '{existing}' is not writable ({err.strerror})"
        ) from None
