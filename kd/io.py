"""Atomic file writes: a reader (or a crash) never sees a half-written metrics file or checkpoint.

The content goes to a temporary file in the destination's directory, is flushed to disk, and replaces
the destination with ``os.replace`` (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` keeps its previous content.

    Example::

        with atomic_write("metrics/teacher.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (sorted keys are not imposed; insertion order kept)."""
    text = json.dumps(obj, indent=indent) + "\n"  # serialise first: a TypeError leaves no temp file
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically, byte-identical for identical ``obj``.

    Saving through a file object keeps the zip archive's root folder at torch's fixed ``archive/``; given
    a path, torch names it after the (random) temporary file, so equal weights would hash differently in DVC.
    """
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
