"""What a tired user or a cluster does to a run: a second launch on the same run, SIGTERM to the whole process group,
Ctrl-C, shared storage (file modes), W&B without network, and bad input that must end in one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from builders import fake_scontrol
from cli_helpers import run_main
from e2e_helpers import cli_command, run_cli, wait_for

from simmim_swin.checkpoint import find_latest_checkpoint, load_checkpoint

# a 3-stage 16-wide SwinV2 at 32 px on the bundled photos; long epochs so a run is still going when signalled
BASE = [
    "model.arch=pico",
    "model.img_size=32",
    "model.window_size=4",
    "mask.mask_patch_size=8",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=8000",
    "schedule=cosine",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "logger.log_every=1",
    "logger.image_every=100000",
    "run.save_every=100000",
    "run.device=cpu",
]
SHORT = ["data.samples_per_epoch=24", "logger.image_every=3", "run.save_every=3"]


def start(tmp_path: Path, name: str, *overrides: str, **popen) -> subprocess.Popen:
    """A pretraining run in the background, its output (stdout and stderr together) on a pipe."""
    command = cli_command(tmp_path, "pretrain", f"run.name={name}", *BASE, *overrides)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, **popen)


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, count: int) -> None:
    wait_for(lambda: len(logged_steps(run_dir)) >= count, 300, proc)


@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused_and_the_first_is_unharmed(tmp_path):
    first = start(tmp_path, "shared")
    try:
        wait_for_steps(first, tmp_path / "shared", 2)
        began = time.monotonic()  # the second launch: the entry point in this process, while the first trains
        second = run_main("pretrain", f"run.output_dir={tmp_path}", "run.name=shared", *BASE)
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.monotonic() - began < 60
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], second.stderr
        wait_for_steps(first, tmp_path / "shared", len(logged_steps(tmp_path / "shared")) + 2)  # still training
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, output[-2000:]
    steps = logged_steps(tmp_path / "shared")
    assert steps == sorted(set(steps)), "every step is logged once"
    assert not (tmp_path / "shared" / "run.lock").exists()  # released on the way out


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_at_the_step(tmp_path):
    """What `timeout`, `scancel` and Slurm's time limit do: every process of the job, data workers included."""
    proc = start(tmp_path, "group", "data.num_workers=2", start_new_session=True)
    wait_for_steps(proc, tmp_path / "group", 2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "received SIGTERM" in output
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "group"))
    assert state["step"] >= logged_steps(tmp_path / "group")[-1] >= 2


@pytest.mark.slow
def test_ctrl_c_saves_at_the_step_and_exits_130(tmp_path):
    proc = start(tmp_path, "interrupted", start_new_session=True)
    wait_for_steps(proc, tmp_path / "interrupted", 2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal sends Ctrl-C to the whole foreground group
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "received SIGINT: saved a checkpoint at step" in output
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "interrupted"))
    assert state["step"] >= logged_steps(tmp_path / "interrupted")[-1]
    assert (tmp_path / "interrupted" / "pretrain.log").read_text().count("received SIGINT") == 1  # the run's log


@pytest.mark.slow
def test_sigusr1_under_sbatch_saves_releases_the_lock_and_requeues_the_job(tmp_path):
    """The pre-emption / time-limit warning of many clusters: saved like SIGTERM, then the job goes back in the
    queue with its id (a requeued job runs the same command and so resumes the same run directory)."""
    bin_dir, calls = fake_scontrol(tmp_path)
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = start(tmp_path, "usr1", env=env)
    wait_for_steps(proc, tmp_path / "usr1", 2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert "Traceback" not in output and "received SIGUSR1: saved a checkpoint at step" in output
    assert "requeued Slurm job 4242" in output
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "usr1"))
    assert state["step"] >= logged_steps(tmp_path / "usr1")[-1] >= 2
    assert not (tmp_path / "usr1" / "run.lock").exists()
    assert "requeue 4242" in calls.read_text().splitlines()


def _session_gone(session: int, timeout_s: float) -> bool:
    """No process of the session (the run and its loader workers) is left, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_an_error_under_simmim_debug_with_loader_workers_exits_as_without_it(tmp_path):
    """The traceback first, then the same line and status; the loader workers (which ignore SIGTERM) are gone."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):  # 8 files, 2 per batch: every epoch reads them all
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
        (folder / f"notes{i}.jpg").write_text("not an image")
    data = ["data=folder", f"data.root={folder}", "data.batch_size=2", "data.num_workers=2"]
    data += ["data.max_bad_fraction=0", "data.bad_check_after=0"]
    results = {}
    for debug in ("0", "1"):
        command = cli_command(tmp_path, "pretrain", f"run.name=debug{debug}", *BASE, *data)
        env = {**os.environ, "SIMMIM_DEBUG": debug}
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=240)  # it used to wait forever on its workers
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert _session_gone(proc.pid, timeout_s=30), "loader workers outlived the run"
        results[debug] = (proc.returncode, err)
    assert results["0"][0] == results["1"][0] == 2, results
    assert "Traceback" not in results["0"][1] and "Traceback (most recent call last)" in results["1"][1]
    last_lines = [err.strip().splitlines()[-1] for _, err in results.values()]
    assert last_lines[0] == last_lines[1] and "notes" in last_lines[0]


@pytest.mark.slow
def test_written_files_respect_the_umask(tmp_path):
    def umask_022() -> None:
        os.umask(0o022)

    command = cli_command(tmp_path, "pretrain", "run.name=modes", *BASE, *SHORT)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=umask_022)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in (tmp_path / "modes").rglob("*") if p.is_file() and ".hydra" not in p.parts]
    names = {p.name for p in files}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "latest", "step_00000003.pt"} <= names, names
    assert any(n.startswith("recon_") for n in names)
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644}
    assert wrong == {}


@pytest.mark.slow
def test_wandb_online_without_a_reachable_server_falls_back_to_offline(tmp_path):
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "HOME": str(tmp_path)}
    args = [f"run.output_dir={tmp_path}", "run.name=nonet", *BASE, *SHORT, "logger.wandb=online"]
    began = time.monotonic()
    result = run_main("pretrain", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unreachable" in result.stderr and "wandb sync" in result.stderr
    assert time.monotonic() - began < 240  # wandb alone would wait ~110 s and then kill the run
    assert list((tmp_path / "nonet" / "wandb").glob("offline-run-*"))


def test_wandb_online_without_an_api_key_stops_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    args = [f"run.output_dir={tmp_path}", "run.name=nokey", *BASE, *SHORT, "logger.wandb=online"]
    result = run_main("pretrain", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: logger.wandb=online needs a W&B API key for api.wandb.ai: run `wandb login` or set WANDB_API_KEY, "
        "or log locally with logger.wandb=offline (upload later with `wandb sync`)"
    ]
    assert not (tmp_path / "nokey" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished 3-step run whose directory no bad command may change."""
    root = tmp_path_factory.mktemp("existing")
    run_cli(root, "pretrain", "run.name=kept", *BASE, *SHORT, "run.max_steps=3")
    return root


def snapshot(run_dir: Path) -> dict[str, str]:
    """Content hash of every file of a run directory but Hydra's own records (.hydra/, the job log)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def garbage_files(root: Path) -> dict[str, Path]:
    files = {"empty.safetensors": b"", "garbage.safetensors": b"\x00\x01not a safetensors file" * 10, "a_file": b"x"}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return {name: root / name for name in files}


PRETRAIN_BAD = [
    (["optim.base_lr=-1"], "optim.base_lr=-1.0 must be > 0"),
    (["optim.base_lr=nan"], "optim.base_lr=nan is not a finite number"),
    (["optim.base_lr=inf"], "optim.base_lr=inf is not a finite number"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
    (["run.max_steps=-5"], "run.max_steps=-5 must be >= 0"),
    (["model.img_size=-32"], "model.img_size=-32 must be a positive int"),
    (["model.patch_size=0"], "model.patch_size=0 must be >= 1"),
    (["model.arch=gigantic"], "model.arch='gigantic' is not a known size"),
    (["optim.lr=0.1"], "optim.lr"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["finetune=quickstart"], "simmim-finetune"),
    (["data=folder"], "data.root"),
    (["data=folder", "data.root={tmp}/no_such_folder"], "no_such_folder"),
    (["mask.mask_ratio=1.5"], "mask"),
    (["schedule.warmup_epochs=5", "schedule.epochs=2"], "schedule.warmup_epochs=5"),
    (["run.parallel=zero3"], "run.parallel='zero3' is unknown"),
    (["logger.wandb=sometimes"], "logger.wandb='sometimes' is unknown"),
    (["data.max_bad_fraction=2"], "data.max_bad_fraction=2.0 must lie in [0, 1]"),
    (["run.name=kept", "model.window_size=2"], "model.window_size: 4 -> 2"),
    (["run.name=kept", "data.batch_size=4"], "total batch"),
    (["run.output_dir={tmp}/a_file", "run.name=x"], "a_file"),
]
FINETUNE_BAD = [
    (["pretrained={tmp}/no_such_run"], "no_such_run"),
    (["pretrained={tmp}/garbage.safetensors"], "garbage.safetensors is not a readable .safetensors file"),
    (["pretrained={tmp}/empty.safetensors"], "empty.safetensors is not a readable .safetensors file"),
    (["experiment=quickstart"], "simmim-pretrain"),
    (["augment.mixup_mode=row"], "augment.mixup_mode='row' is unknown"),
    (["evaluate={tmp}/kept"], "has no classifier head"),
]
TOOLS_BAD = [
    (["inspect", "{tmp}/garbage.safetensors"], "garbage.safetensors is not a readable .safetensors file"),
    (["inspect", "{tmp}/no_such_file.pt"], "no_such_file.pt"),
    (["reconstruct", "--checkpoint", "{tmp}/kept", "--images", "{tmp}", "--out", "{tmp}/r.png"], "is a directory"),
    (["export", "{tmp}/kept", "--out", "{tmp}/a_file/encoder.safetensors"], "a_file"),
    (["plot", "{tmp}/kept", "--out", "{tmp}/a_file/p.png"], "a_file"),
    (["make-shards", "{tmp}/no_such_folder", "--out", "{tmp}/shards"], "no_such_folder"),
]


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [("pretrain", *case) for case in PRETRAIN_BAD]
    + [("finetune", *case) for case in FINETUNE_BAD]
    + [("tools", *case) for case in TOOLS_BAD],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_bad_input_ends_in_one_line_and_changes_nothing(existing_run, module, args, message):
    garbage_files(existing_run)
    before = snapshot(existing_run / "kept")
    args = [a.replace("{tmp}", str(existing_run)) for a in args]
    if module != "tools":
        # fine-tuning's default data.source=folder needs data.root at the door (the folder is not read here)
        base = [f"data.root={existing_run}"] if module == "finetune" else BASE
        args = [f"run.output_dir={existing_run}", *base, *args]
        args += [] if any(a.startswith("run.name=") for a in args) else [f"run.name=bad_{module}"]
    result = run_main(module, *args, cwd=existing_run)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and message.replace("{tmp}", str(existing_run)) in lines[0], result.stderr[-3000:]
    assert snapshot(existing_run / "kept") == before
