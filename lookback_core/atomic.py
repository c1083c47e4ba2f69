"""Files that are never seen half-written: write to a hidden temporary name, then rename.

Every file the project writes (reports, facts, pictures, videos, weights) goes through
:func:`atomic_path` (or its helpers :func:`write_text`, :func:`write_image`,
:func:`save_safetensors`): a failed write, a full disk included, leaves an existing file as it was.
The temporary file is ``.<name>.<pid>-<random>.part`` beside the target. A writer that is killed
outright (SIGKILL, power loss) cannot remove its own; the next write to the same target removes
every such leftover whose process is gone. The file gets the mode a plain write would give it:
a replaced file's own, a new one's from the umask.

Also here: what an ``OSError`` of a write means in the user's words (:func:`describe_os_error`),
and what a path that should be a file is instead (:func:`file_problem`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
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
        try:
            yield partial
            if partial.is_file():
                partial.chmod(_mode_for(path))
            os.replace(partial, path)
        except OSError as err:
            named = err.filename
            if not isinstance(named, str | bytes | os.PathLike) or Path(os.fsdecode(named)) != partial:
                raise
            # the error names the file being written, not its temporary name
            raise type(err)(err.errno, err.strerror, str(path)) from err
    finally:
        partial.unlink(missing_ok=True)


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # no other way to read it; set back at once
        os.umask(mask)
        return mask


def _mode_for(path: Path) -> int:
    """The permissions a plain write to ``path`` would leave: a replaced file keeps its own, a new
    file gets 0666 less the umask (some writers, safetensors' among them, create theirs 0600)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` (UTF-8) into ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def write_image(path: str | os.PathLike[str], image: Image.Image | np.ndarray) -> Path:
    """A picture (a PIL image, or uint8 ``[h, w]`` / ``[h, w, 3]``) into ``path`` through
    :func:`atomic_path`, in the format of its suffix (``.png``, ``.jpg`` ...); returns ``path``."""
    path = Path(path)
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot write a picture to '{path}': unknown image suffix '{path.suffix}'")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path) as partial:
        image.save(partial, format=kind)
    return path


def save_safetensors(
    tensors: dict, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as partial:
        save_file(tensors, partial, metadata=metadata or None)
    return Path(path)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(
    err: OSError, *, place: str = "place to write", then: str = "run the command again"
) -> str:
    """An OSError in the user's words: which file, and for a full or read-only disk what to do:
    free some space or choose another ``place``, then ``then``."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in FULL_DISK:
        named = isinstance(err.filename, str | bytes | os.PathLike)
        folder = Path(os.fsdecode(err.filename)).absolute().parent if named else Path.cwd()
        try:
            free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
            room = f"{free / 2**30:.1f} GiB free"
        except OSError:
            room = "free space unknown"
        if err.errno == errno.EDQUOT:
            room = f"{err.strerror}; {room}"
        return f"{where}no space left on the disk ({room}); free some space or choose another {place}, then {then}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}cannot write there ({err.strerror}); choose a writable {place}"
    return f"{where}{err.strerror or err}"


_NOT_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a file: ``"no such file"``, ``"is a folder, expected a file"``
    (or a FIFO, socket, device: never opened, which for a FIFO would wait); None for a file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _NOT_FILES if test(mode)), "not a regular file")
    return f"is {kind}, expected a file"


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
