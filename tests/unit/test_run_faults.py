"""What goes wrong around a run, in-process: a full disk while saving, the run directory deleted under it, the
one-line errors (also with SIMMIM_DEBUG=1), and the Slurm requeue after a stop signal."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
from builders import PatchedWrites
from builders import fake_scontrol as write_fake_scontrol

import simmim_swin.files
import simmim_swin.pretrain
from simmim_swin.checkpoint import find_latest_checkpoint, load_checkpoint
from simmim_swin.cli.errors import DEBUG_ENV, RUN_FAILED, command_errors
from simmim_swin.config import PretrainConfig, from_dict
from simmim_swin.distributed import requeue_slurm_job
from simmim_swin.pretrain import run_pretrain
from simmim_swin.progress import command_logging
from simmim_swin.run import RunDirectoryGone


def settings(tmp_path: Path, **run) -> PretrainConfig:
    return from_dict(
        PretrainConfig,
        {
            "model": {"arch": "pico", "img_size": 32, "window_size": 4, "drop_path_rate": 0.0},
            "mask": {"mask_patch_size": 8},
            "data": {"batch_size": 4, "num_workers": 0, "samples_per_epoch": 32},
            "schedule": {"epochs": 1, "warmup_epochs": 0, "kind": "cosine"},
            "logger": {"log_every": 1, "image_every": 100, "num_images": 1},
            "run": {"output_dir": str(tmp_path), "name": "faults", "device": "cpu", "save_every": 2, **run},
        },
    )


def _disk_full(file, data: bytes) -> int:
    """A write to a disk that is full."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_pretrain(settings(tmp_path, max_steps=2))
    before = find_latest_checkpoint(tmp_path / "faults")
    assert before.name == "step_00000002.pt"

    real_open = simmim_swin.files.open_temporary

    def open_on_a_full_disk(fd: int):
        name = os.readlink(f"/proc/self/fd/{fd}")  # the temporary file: only checkpoints find the disk full
        return PatchedWrites(real_open(fd), _disk_full) if Path(name).name.startswith(".step_") else real_open(fd)

    monkeypatch.setattr(simmim_swin.files, "open_temporary", open_on_a_full_disk)
    with pytest.raises(OSError) as failure:
        run_pretrain(settings(tmp_path, max_steps=4))
    # torch.save turns the failed write into a RuntimeError of its own: the OSError and the file are kept
    assert failure.value.errno == errno.ENOSPC
    assert failure.value.filename == str(tmp_path / "faults" / "checkpoints" / "step_00000004.pt")
    assert find_latest_checkpoint(tmp_path / "faults") == before
    assert load_checkpoint(before)["step"] == 2
    assert not list((tmp_path / "faults" / "checkpoints").glob(".*.tmp"))
    assert not (tmp_path / "faults" / "run.lock").exists()


def test_a_full_disk_is_one_line_in_the_run_log_and_exit_status_1(tmp_path, capsys):
    log = tmp_path / "run" / "pretrain.log"
    target = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    with pytest.raises(SystemExit) as exit_status, command_logging(log), command_errors():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    assert exit_status.value.code == RUN_FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device (ENOSPC)" in lines[0] and str(target) in lines[0]
    assert log.read_text().strip() == lines[0]


def test_a_deleted_run_directory_is_named_in_one_error(tmp_path, monkeypatch):
    evaluations = simmim_swin.pretrain._evaluations

    def delete_the_run_dir_at_step_3(config, run, *args, **kwargs):
        if run.step == 3:
            shutil.rmtree(run.run_dir)
        return evaluations(config, run, *args, **kwargs)

    monkeypatch.setattr(simmim_swin.pretrain, "_evaluations", delete_the_run_dir_at_step_3)
    with pytest.raises(RunDirectoryGone, match=rf"the run directory {tmp_path / 'faults'} was deleted .*step 3"):
        run_pretrain(settings(tmp_path, max_steps=6))


def test_a_deleted_run_directory_is_noticed_when_a_write_recreated_it(tmp_path, monkeypatch):
    """A panel written after the deletion creates the folder again: it is not the run's folder any more."""
    evaluations = simmim_swin.pretrain._evaluations

    def delete_and_recreate(config, run, *args, **kwargs):
        if run.step == 3:
            shutil.rmtree(run.run_dir)
            (run.run_dir / "images").mkdir(parents=True)
        return evaluations(config, run, *args, **kwargs)

    monkeypatch.setattr(simmim_swin.pretrain, "_evaluations", delete_and_recreate)
    with pytest.raises(RunDirectoryGone, match="was deleted while the run was going"):
        run_pretrain(settings(tmp_path, max_steps=6))


def test_a_deleted_run_directory_exits_1_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_status, command_errors():
        raise RunDirectoryGone(f"the run directory {tmp_path} was deleted while the run was going (at step 3)")
    assert exit_status.value.code == RUN_FAILED
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the run directory {tmp_path} was deleted while the run was going (at step 3)"
    ]


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback_and_keeps_the_exit_status(capsys, monkeypatch, debug):
    if debug:
        monkeypatch.setenv(DEBUG_ENV, "1")
    else:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_status, command_errors():
        raise ValueError("data.root=/nowhere does not exist")
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: data.root=/nowhere does not exist"
    assert ("Traceback (most recent call last)" in err) == debug


# ------------------------------------------------------------------------------------------------- Slurm requeue


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments and reports the job state in $FAKE_JOB_STATE."""
    bin_dir, calls = write_fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FAKE_JOB_STATE", "RUNNING")
    for name in ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER"):
        monkeypatch.delenv(name, raising=False)
    return lambda: calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_an_sbatch_job_stopped_by_its_time_limit_requeues_itself(fake_scontrol, caplog, signum):
    caplog.set_level(logging.INFO, logger="simmim_swin")
    assert requeue_slurm_job(signum)
    assert "requeue 4242" in fake_scontrol()
    assert "requeued Slurm job 4242" in caplog.text


def test_a_cancelled_job_ctrl_c_and_submitit_jobs_are_not_requeued(fake_scontrol, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="simmim_swin")
    assert not requeue_slurm_job(signal.SIGINT)  # Ctrl-C in an interactive allocation
    monkeypatch.setenv("FAKE_JOB_STATE", "CANCELLED")  # scancel sends the same SIGTERM
    assert not requeue_slurm_job(signal.SIGTERM)
    assert "was cancelled: not requeued" in caplog.text
    monkeypatch.setenv("FAKE_JOB_STATE", "RUNNING")
    monkeypatch.setenv("SUBMITIT_FOLDER", "/somewhere")  # submitit requeues its jobs itself
    assert not requeue_slurm_job(signal.SIGTERM)
    assert not any(call.startswith("requeue") for call in fake_scontrol())


def test_a_failed_requeue_says_how_to_resume(fake_scontrol, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol at all
    assert not requeue_slurm_job(signal.SIGUSR1)
    assert "could not requeue Slurm job 4242" in caplog.text  # a warning
