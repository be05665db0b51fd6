"""The run lifecycle shared by both loops: the run lock, clean-up of interrupted saves, the resume check."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import PatchedWrites

from simmim_swin.config import ConfigError
from simmim_swin.run import LOCK_FILE, RunLock, RunLockedError, check_same_settings, remove_stale_temporaries


def _write_lock(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-12-03 08:00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, socket.gethostname(), holder.pid)
        with pytest.raises(RunLockedError, match=rf"in use by process {holder.pid} on {socket.gethostname()}"):
            RunLock(tmp_path, 600).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, socket.gethostname(), dead.pid)
    lock = RunLock(tmp_path, 600)
    with pytest.warns(UserWarning, match=f"process {dead.pid} on .* is gone"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_is_taken_over_only_without_a_heartbeat(tmp_path):
    _write_lock(tmp_path, "node-that-does-not-exist", 12345, age_s=30)
    with pytest.raises(RunLockedError, match="node-that-does-not-exist"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-that-does-not-exist"  # untouched
    _write_lock(tmp_path, "node-that-does-not-exist", 12345, age_s=120)
    with pytest.warns(UserWarning, match="no heartbeat from node-that-does-not-exist for 1[12]\\d s"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())  # taken over, not just warned


def _slow_write(file, text: str) -> int:
    """A write that takes a while, as on a busy network file system."""
    time.sleep(0.05)
    return file.write(text)


def _contend(run_dir: Path, go, results, release) -> None:
    """One of many processes starting the same run at once: report whether it got the lock, hold it until told."""
    real_fdopen = os.fdopen
    # this child process only
    os.fdopen = lambda *args, **kwargs: PatchedWrites(real_fdopen(*args, **kwargs), _slow_write)
    go.wait()
    try:
        lock = RunLock(run_dir, 600)
        lock.acquire()
    except RunLockedError:
        results.put("refused")
        return
    except Exception as e:  # anything else is a failure the test names
        results.put(repr(e))
        return
    results.put("won")
    release.wait(60)
    lock.release()


@pytest.mark.parametrize("left_behind", ["none", "dead process"])
def test_exactly_one_of_many_simultaneous_starts_takes_the_lock(tmp_path, left_behind):
    if left_behind == "dead process":  # each start finds a stale lock to take over: still one winner
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _write_lock(tmp_path, socket.gethostname(), dead.pid)
    context = multiprocessing.get_context("fork")
    go, release, results = context.Event(), context.Event(), context.Queue()
    starts = [context.Process(target=_contend, args=(tmp_path, go, results, release)) for _ in range(24)]
    for process in starts:
        process.start()
    go.set()
    try:
        outcomes = [results.get(timeout=120) for _ in starts]
    except queue.Empty:
        outcomes = ["no answer"]
    finally:
        release.set()
        for process in starts:
            process.join(60)
    assert sorted(outcomes) == ["refused"] * 23 + ["won"]
    assert not (tmp_path / LOCK_FILE).exists()  # the winner released it
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_an_empty_or_half_written_lock_is_never_taken_as_stale(tmp_path):
    """A lock another process is still writing must not be taken over; only one untouched for long is stale."""
    path = tmp_path / LOCK_FILE
    for content in ("", '{"host": "node-1", "pi'):
        path.write_text(content)
        with pytest.raises(RunLockedError, match="cannot be read .*another process may be starting this run"):
            RunLock(tmp_path, 600).acquire()
        assert path.read_text() == content
    then = time.time() - 700
    os.utime(path, (then, then))
    lock = RunLock(tmp_path, 600)
    with pytest.warns(UserWarning, match="unreadable and untouched for 70\\d s"):
        lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_appears_with_its_content(tmp_path, monkeypatch):
    """Whoever sees run.lock can read its holder: it is linked into place already written."""
    seen = []
    real_link = os.link

    def link_and_look(source, target, *args, **kwargs):
        real_link(source, target, *args, **kwargs)
        seen.append(Path(target).read_text())

    monkeypatch.setattr(os, "link", link_and_look)
    lock = RunLock(tmp_path, 600)
    lock.acquire()
    assert json.loads(seen[0])["pid"] == os.getpid()
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock(tmp_path, 600)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (time.time() - 500, time.time() - 500))
    lock.heartbeat()
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_stale_temporaries_of_an_interrupted_save_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".step_00000010.dcp.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step_00000010.pt.ab12cd.tmp").write_bytes(b"half")
    (tmp_path / ".summary.json.x1.tmp").write_text("{")
    keep = tmp_path / "checkpoints" / "step_00000008.pt"
    keep.write_bytes(b"good")
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 3 and all(not p.exists() for p in removed)
    assert keep.read_bytes() == b"good"


def test_resume_check_names_every_changed_setting(tmp_path):
    saved = {"model": {"arch": "pico", "img_size": 32}, "mask": {"mask_ratio": 0.6}}
    current = {"model": {"arch": "nano", "img_size": 32}, "mask": {"mask_ratio": 0.6}}
    check_same_settings(saved, saved, ("model", "mask"), tmp_path)
    with pytest.raises(ConfigError, match=r"model.arch: 'pico' -> 'nano'.*run.name=<new name>"):
        check_same_settings(saved, current, ("model", "mask"), tmp_path)
