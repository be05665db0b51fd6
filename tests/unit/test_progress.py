"""The progress display (a tqdm bar on a terminal, plain lines elsewhere and in the log) and a command's messages
(the terminal and the run's log file)."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
from fake_stream import FakeStream

from simmim_swin.cli.errors import command_errors, fail
from simmim_swin.progress import PACKAGE_LOGGER, Progress, StepProgress, command_logging


@pytest.fixture
def messages(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The package's messages at INFO (a library leaves its level to the application)."""
    caplog.set_level(logging.INFO, logger=PACKAGE_LOGGER)
    return caplog


def _lines(caplog: pytest.LogCaptureFixture, terminal: bool | None = None) -> list[str]:
    """The messages logged (only those the terminal shows, or only the log file's, with `terminal`)."""
    return [r.getMessage() for r in caplog.records if terminal is None or getattr(r, "terminal", True) == terminal]


def test_step_line_has_the_step_epoch_known_metrics_the_rest_and_the_eta(messages) -> None:
    now = [100.0]
    progress = StepProgress(400, start_step=100, steps_per_epoch=40, tty=False, clock=lambda: now[0])
    progress.show(100, {"loss": 1.0})
    now[0] = 110.0  # 20 steps in 10 s -> 2 steps/s; 280 steps left -> 140 s
    metrics = {"loss": 0.81234, "lr": 1.2e-4, "grad_norm": torch.tensor(1.234), "images_per_sec": 85.24}
    progress.show(120, {**metrics, "data_s": 0.01, "epoch": 3.0})
    assert _lines(messages) == [
        "step 100/400 ep 2 loss 1.0000 eta ?",
        "step 120/400 ep 3 loss 0.8123 lr 1.20e-04 grad 1.23 img/s 85.2 data_s 0.01 eta 0:02:20",
    ]


def test_step_line_eta_counts_hours_past_a_day(messages) -> None:
    now = [0.0]
    progress = StepProgress(100_000, start_step=0, steps_per_epoch=1000, tty=False, clock=lambda: now[0])
    now[0] = 100.0
    progress.show(10, {})
    assert _lines(messages) == ["step 10/100000 ep 0 eta 277:45:00"]  # 99990 steps at 0.1 step/s


def test_plain_lines_when_not_a_terminal(messages) -> None:
    stream, now = FakeStream(tty=False), [0.0]
    progress = StepProgress(100, start_step=0, steps_per_epoch=10, stream=stream, clock=lambda: now[0])
    now[0] = 10.0
    progress.show(10, {"loss": 0.5, "lr": 1e-3, "images_per_sec": 64.0, "data_wait_frac": 0.125})
    progress.show(20, {"loss": 0.25})
    progress.close()
    assert _lines(messages, terminal=True) == [
        "step 10/100 ep 1 loss 0.5000 lr 1.00e-03 img/s 64.0 data_wait_frac 0.125 eta 0:01:30",
        "step 20/100 ep 2 loss 0.2500 eta 0:00:40",
    ]
    assert stream.getvalue() == ""  # no bar: the lines are messages (the terminal handler prints them)


def test_a_terminal_gets_a_bar_with_the_known_metrics_and_the_log_every_line(messages) -> None:
    stream, now = FakeStream(tty=True), [0.0]
    progress = StepProgress(100, start_step=0, steps_per_epoch=10, stream=stream, clock=lambda: now[0])
    now[0] = 10.0
    progress.show(10, {"loss": 0.5, "lr": 1e-3, "images_per_sec": 64.0, "data_wait_frac": 0.125})
    progress.show(20, {"loss": 0.25, "grad_norm": 1.5})
    progress.close()
    progress.close()  # a second close does nothing
    drawn = stream.getvalue()
    assert "\r" in drawn and "ep 1" in drawn and "10/100" in drawn and "20/100" in drawn
    assert "loss 0.5000 lr 1.00e-03 img/s 64.0" in drawn and "loss 0.2500 grad 1.50" in drawn  # the postfix
    assert "data_wait_frac" not in drawn  # the bar shows the known metrics only
    assert drawn.endswith("\n")  # closed: later output starts on a fresh line
    assert _lines(messages, terminal=True) == []  # not repeated on the terminal under the bar
    assert _lines(messages, terminal=False) == [  # the run's log gets every line with all metrics
        "step 10/100 ep 1 loss 0.5000 lr 1.00e-03 img/s 64.0 data_wait_frac 0.125 eta 0:01:30",
        "step 20/100 ep 2 loss 0.2500 grad 1.50 eta 0:00:40",
    ]


def test_item_progress_logs_every_n_items_and_the_last(messages) -> None:
    now = [0.0]
    progress = Progress(5, "make-shards x", every=2, stream=FakeStream(tty=False), clock=lambda: now[0])
    for _ in range(5):
        now[0] += 0.5
        progress.update()
    progress.close()
    assert _lines(messages) == ["make-shards x: 2/5 (2/s)", "make-shards x: 4/5 (2/s)", "make-shards x: 5/5 (2/s)"]


def test_item_progress_on_a_terminal_is_a_bar_that_ends_in_the_log(messages) -> None:
    stream, now = FakeStream(tty=True), [0.0]
    progress = Progress(4, "d", stream=stream, clock=lambda: now[0])
    for t in (0.5, 1.0, 1.5, 2.0):
        now[0] = t
        progress.update()
    progress.close()
    assert "d: 100%" in stream.getvalue() and "4/4" in stream.getvalue()
    assert _lines(messages, terminal=True) == [] and _lines(messages, terminal=False) == ["d: 4/4 (2/s)"]


@pytest.mark.parametrize("tty", [False, True])
def test_the_run_log_gets_every_message_and_progress_line(tmp_path, monkeypatch, tty) -> None:
    """As in a run: messages and progress during a command reach the terminal and, as plain lines, the log file;
    the handlers are gone afterwards."""
    terminal = FakeStream(tty=tty)
    monkeypatch.setattr(sys, "stdout", terminal)
    log_file = tmp_path / "run" / "pretrain.log"
    logger = logging.getLogger("simmim_swin.pretrain")
    with command_logging(log_file):
        logger.info("pretraining pico ...")
        progress = StepProgress(30, start_step=0, steps_per_epoch=10)
        for step in (10, 20, 30):
            progress.show(step, {"loss": 1.0 / step, "data_wait_frac": 0.5})
        progress.close()
        logger.info("done at step 30/30")
    lines = log_file.read_text().splitlines()
    assert lines[0] == "pretraining pico ..." and lines[-1] == "done at step 30/30" and len(lines) == 5
    assert [line.split(" ep ")[0] for line in lines[1:4]] == ["step 10/30", "step 20/30", "step 30/30"]
    assert all("data_wait_frac 0.5" in line and "\r" not in line for line in lines[1:4])
    shown = terminal.getvalue()
    assert "pretraining pico ...\n" in shown and "done at step 30/30\n" in shown
    assert ("data_wait_frac" in shown) == (not tty)  # the plain lines, or a bar with the known metrics only
    assert not logging.getLogger(PACKAGE_LOGGER).handlers


def test_the_final_error_line_reaches_stderr_and_the_run_log_once(tmp_path, capsys) -> None:
    log_file = tmp_path / "run" / "finetune.log"
    with pytest.raises(SystemExit) as exit_status, command_logging(log_file), command_errors():
        logging.getLogger("simmim_swin.finetune").warning("skipping unreadable image x.png: truncated")
        raise ValueError("data.root=/nowhere does not exist")
    assert exit_status.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["skipping unreadable image x.png: truncated", "error: data.root=/nowhere does not exist"]
    assert log_file.read_text().splitlines() == err
    with pytest.raises(SystemExit):
        fail("outside a command")  # no handlers: printed on stderr all the same
    assert capsys.readouterr().err == "error: outside a command\n"


def test_ranks_above_0_show_warnings_only_and_write_no_log(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    with command_logging(tmp_path / "pretrain.log"):
        logging.getLogger("simmim_swin.run").info("resuming ...")
        logging.getLogger("simmim_swin.data.stream").warning("skipping bad sample")
    assert capsys.readouterr() == ("", "skipping bad sample\n")
    assert not (tmp_path / "pretrain.log").exists()


def test_python_warnings_during_a_command_reach_stderr_and_the_run_log(tmp_path, capsys) -> None:
    log_file, before = tmp_path / "pretrain.log", warnings.showwarning
    with command_logging(log_file):
        warnings.warn("taking over the lock run.lock: process 1 is gone", UserWarning, stacklevel=1)
    assert "UserWarning: taking over the lock run.lock: process 1 is gone" in capsys.readouterr().err
    assert "UserWarning: taking over the lock run.lock: process 1 is gone" in log_file.read_text()
    assert warnings.showwarning is before  # logging.captureWarnings undone


def test_a_captured_warning_is_one_line_and_a_hosts_own_capture_stays_on(tmp_path, capsys):
    with command_logging(log_file=tmp_path / "x.log"):
        warnings.warn("careful", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "careful" in err and not err.endswith("\n\n"), repr(err)  # warnings' own newline is not doubled
    text = (tmp_path / "x.log").read_text()
    assert "careful" in text and "\n\n" not in text, repr(text)
    assert warnings.showwarning is not logging._showwarning  # off again after the command
    logging.captureWarnings(True)  # a notebook or a host program that captures warnings itself
    try:
        with command_logging():
            pass
        assert warnings.showwarning is logging._showwarning
    finally:
        logging.captureWarnings(False)
