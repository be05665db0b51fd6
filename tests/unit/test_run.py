"""The run lifecycle shared by both loops: the run lock, clean-up of interrupted saves, the resume check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    _write_lock(tmp_path, "node-that-does-not-exist", 12345, age_s=120)
    with pytest.warns(UserWarning, match="no heartbeat from node-that-does-not-exist for 1[12]\\d s"):
        RunLock(tmp_path, stale_after_s=60).acquire()


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
