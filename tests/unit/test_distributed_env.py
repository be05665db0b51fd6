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
    ignore_stop_signals,
    launcher_rank,
    process_group,
    stop_signals,
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


@pytest.mark.parametrize("signum", stop_signals())
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


def test_submitit_preempt_signal_is_watched_too(monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert set(stop_signals()) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL")
    # SIGUSR1: the time-limit / pre-emption warning of many clusters (and Lightning's) stops the run the same way
    assert stop_signals() == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _skip_agreement_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from simmim_swin.engine import train_step

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss_fn(model, batch):
            loss = model(batch[0]).square().mean()
            # rank 1's loss value is NaN but its gradient is finite: only the loss says the step is bad
            return loss + torch.tensor(float("nan")) if rank == 1 else loss

        before = model.module.weight.detach().clone()
        _, _, skipped = train_step(model, [(torch.randn(3, 4),)], loss_fn, optimizer, None, "fp32", "cpu", None)
        results[rank] = (bool(skipped), torch.equal(model.module.weight, before))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_skip_a_step_that_one_rank_finds_non_finite(tmp_path):
    """A non-finite loss on one rank skips the step on every rank, so the replicas never drift apart."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_skip_agreement_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: (True, True), 1: (True, True)}


def test_ctrl_c_stops_at_the_step_and_a_second_one_quits_at_once():
    # Python's default_int_handler, or SIG_IGN when the shell started this process in the background
    previous = signal.getsignal(signal.SIGINT)
    stop = StopSignal(DistInfo())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop() and stop.name == "SIGINT"
        assert Preempted(3, stop.name).exit_code == 130 and Preempted(3, "SIGTERM").exit_code == 143
        stop.hand_over()  # Python's own SIGINT handler (KeyboardInterrupt) is not called over the clean exit
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def test_data_workers_ignore_the_stop_signals():
    previous = {signum: signal.getsignal(signum) for signum in stop_signals()}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in stop_signals())
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process if it were not ignored
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
