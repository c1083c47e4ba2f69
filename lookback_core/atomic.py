"""Files that are never seen half-written: write to a hidden temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    Missing parent folders are created. If the block fails, the temporary file is removed and an
    existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
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
