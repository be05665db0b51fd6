"""atomic_write: content, file mode under the umask, nothing left behind."""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path

import pytest

import simmim_swin.files as files


def test_writes_bytes_text_and_through_a_function(tmp_path: Path) -> None:
    assert files.atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    files.atomic_write(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    files.atomic_write(tmp_path / "t.txt", lambda f: f.write(b"replaced"))
    assert (tmp_path / "t.txt").read_bytes() == b"replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "t.txt"]  # no temporary file left


def test_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        importlib.reload(files)  # the umask is read once, at import
        path = files.atomic_write(tmp_path / "m.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.umask(0o027)
        importlib.reload(files)
        assert stat.S_IMODE(files.atomic_write(tmp_path / "n.txt", "x").stat().st_mode) == 0o640
    finally:
        os.umask(old)
        importlib.reload(files)


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def fail(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
