"""Atomic file writes: a reader (a resume, wandb, a browser, a sync job) or a crash never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# mkstemp's mode 0600 would survive os.replace (files unreadable by the group whatever the umask): give them the mode
# open() would; os.umask can only be read by setting it, so once, at import
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
    """Write `content` (bytes, UTF-8 text, or a function of the open binary file, e.g. `lambda f: torch.save(s, f)`)
    to `path` atomically (temporary file, fsync, rename, fsync of the folder); if it raises, `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # dot-prefixed, so that it never matches a pattern such as step_*.pt
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open_temporary(fd) as raw:
            f = _WriteErrors(raw)
            try:
                if callable(content):
                    content(f)
                else:
                    f.write(content.encode("utf-8") if isinstance(content, str) else content)
                f.flush()
            except Exception as e:
                # torch.save reports a failed write (disk full, quota) as a RuntimeError of its own that loses
                # the errno: raise the write's OSError instead, naming the file being written
                if f.error is None:
                    raise
                raise OSError(f.error.errno, f.error.strerror, str(path)) from e
            os.fsync(raw.fileno())
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp_name):  # name the target, not the temporary file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)
    return path


def open_temporary(fd: int) -> IO[bytes]:
    """The binary file object atomic_write writes its temporary file through."""
    return os.fdopen(fd, "wb")


class _WriteErrors:
    """A writable binary file that remembers the first OSError of a write or flush (e.g. ENOSPC)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> object:  # tell, seek, fileno ... of the real file
        return getattr(self.file, name)
