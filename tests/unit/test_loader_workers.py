"""Data-loader workers ignore the stop signals but never outlive the main process, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")

# a loader of 2 workers built as the training loops build theirs (LoaderWorkerInit); items 0 and 1 give the
# worker's pid, later items keep the worker busy for minutes (a worker busy in __getitem__ never looks at its
# parent: only the kernel's parent-death signal ends it)
LOADER = textwrap.dedent(
    """
    import os, sys, time
    from torch.utils.data import DataLoader, Dataset
    from simmim_swin.distributed import LoaderWorkerInit

    class Pids(Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, index):
            if index >= 2:
                time.sleep(300)
            return os.getpid()

    loader = DataLoader(Pids(), batch_size=1, num_workers=2, persistent_workers=True, worker_init_fn=LoaderWorkerInit())
    batches = iter(loader)
    pids = sorted({int(next(batches)) for _ in range(2)})
    print(*pids, flush=True)
    """
)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent that no longer looks."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_workers_die_with_a_main_process_killed_outright(tmp_path):
    script = LOADER + "time.sleep(300)\n"
    main = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        main.kill()  # SIGKILL: no handler, no atexit, nothing of the main process runs
        main.wait(timeout=60)
        assert _wait_until_gone(workers, timeout_s=60) == []  # busy for 300 s: only the kernel ended them
    finally:
        main.kill()
        _kill_all(workers)


@pytest.mark.slow
def test_an_uncaught_error_with_live_workers_still_ends_the_process(tmp_path):
    """The traceback keeps the loader alive until exit, where multiprocessing SIGTERMs its daemonic children (which
    ignore it) and waits for them: without ending them first the process would never exit."""
    script = LOADER + "raise RuntimeError('a bug in the training loop')\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    workers = [int(pid) for pid in result.stdout.split()]
    try:
        assert result.returncode == 1, result.stderr[-2000:]
        assert "RuntimeError: a bug in the training loop" in result.stderr
        assert len(workers) == 2 and _wait_until_gone(workers, timeout_s=30) == []
    finally:
        _kill_all(workers)


@pytest.mark.slow
def test_workers_ignore_a_stop_signal_sent_to_the_whole_group(tmp_path):
    """`timeout`, `scancel` and Slurm's time limit signal every process of the job: the workers stay for the save."""
    script = LOADER + "time.sleep(300)\n"
    main = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        assert all(_alive(pid) for pid in workers)
    finally:
        main.kill()
        main.wait(timeout=60)
        _kill_all(workers)


@pytest.mark.slow
def test_a_normal_exit_with_live_workers_is_quick_and_quiet(tmp_path):
    """Ending the workers at exit trips no error report (torch's SIGCHLD check would call a killed worker a failure)."""
    result = subprocess.run([sys.executable, "-c", LOADER], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    workers = [int(pid) for pid in result.stdout.split()]
    try:
        assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
        assert len(workers) == 2 and _wait_until_gone(workers, timeout_s=30) == []
    finally:
        _kill_all(workers)
