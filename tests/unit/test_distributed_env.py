"""Launcher environments -> process-group variables, and the stop signals (no process group needed)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from simmim_swin.distributed import (
    DistInfo,
    Preempted,
    StopSignal,
    export_launcher_env,
    launcher_rank,
    process_group,
)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER")
SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the whole environment is put back afterwards (export_launcher_env writes to it)."""
    saved = dict(os.environ)
    for name in (*LAUNCH_VARS, *SLURM_VARS):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_raw_slurm_tasks_become_torch_variables(clean_env):
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu07"}
    for name, value in {**env, "SLURM_JOB_ID": "4242"}.items():
        clean_env.setenv(name, value)
    assert launcher_rank() == 5  # known before any process group exists
    export_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    port = os.environ["MASTER_PORT"]
    # every task of the job derives the same port from the job id
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        del os.environ[name]  # not clean_env.delenv: monkeypatch would put these back after the test
    export_launcher_env()
    assert os.environ["MASTER_PORT"] == port and 20000 <= int(port) < 40000


def test_torchrun_variables_win_and_a_single_slurm_task_is_not_distributed(clean_env):
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_PROCID", "0")
    export_launcher_env()
    assert "RANK" not in os.environ and launcher_rank() == 0
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_PROCID", "7")
    export_launcher_env()
    assert os.environ["RANK"] == "3" and launcher_rank() == 3


def test_compressed_nodelist_without_scontrol_names_the_fix(clean_env):
    for name, value in {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "node[1-2]"}.items():
        clean_env.setenv(name, value)
    clean_env.setenv("PATH", "/nonexistent")  # no scontrol
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        export_launcher_env()


@pytest.mark.parametrize("signum", StopSignal.SIGNALS)
def test_stop_signal_sets_the_flag_and_defers_the_previous_handler(signum):
    calls = []
    old = signal.signal(signum, lambda s, frame: calls.append(s))
    try:
        stop = StopSignal(DistInfo())
        assert not stop.should_stop()
        os.kill(os.getpid(), signum)
        assert stop.should_stop() and stop.name == signal.Signals(signum).name
        assert calls == []  # e.g. submitit's requeue-and-exit waits until the checkpoint is written
        stop.hand_over()
        assert calls == [signum]
        stop.restore()
        os.kill(os.getpid(), signum)
        assert calls == [signum, signum]  # the earlier handler is back
    finally:
        signal.signal(signum, old)


def test_process_group_hands_over_after_a_preempted_run_and_restores_handlers():
    calls = []
    old = signal.signal(signal.SIGTERM, lambda s, frame: calls.append(s))
    try:
        preempted = pytest.raises(Preempted, match="received SIGTERM: saved a checkpoint at step 7")
        with preempted, process_group(torch.device("cpu")) as (device, info, stop):
            assert device == torch.device("cpu") and not info.distributed
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.should_stop() and calls == []
            raise Preempted(7, stop.name)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
    finally:
        signal.signal(signal.SIGTERM, old)
