"""Atomic file writes: a reader (a resume, wandb, a browser, a sync job) or a crash never sees half a file.

Every write goes to a dot-prefixed temporary file in the target's folder (so it never matches a pattern such as
step_*.pt), is flushed and fsynced, gets the mode a plain `open()` would give, and is renamed over the target;
the folder is then fsynced so the rename itself is on disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# tempfile.mkstemp creates files with mode 0600 and os.replace keeps it, which would leave every atomically
# written file unreadable by the group whatever the umask. Read the umask once (os.umask can only be read by
# setting it) and give temporary files the mode open() would: 0o666 & ~umask.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write `content` to `path` atomically and return the path; parent folders are created.

    Args:
        path: the target file; replaced if it exists.
        content: bytes, text (written as UTF-8), or a function called with the open binary file
            (e.g. `lambda f: torch.save(state, f)`). If it raises, the target is untouched and no temporary
            file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    if isinstance(content, bytes):
        data = content

        def content(f: IO[bytes]) -> None:
            f.write(data)

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            content(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
