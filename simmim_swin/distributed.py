"""Process groups from whatever started the job (torchrun, submitit, raw Slurm), model wrapping, and the few
collectives the training loops need. Model code never asks for the rank; the loops get it from here."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so the one registered here runs before it
import os
import signal
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .launcher import launcher_rank as launcher_rank  # re-exported; lives apart so the CLI reads it without torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _slurm_master_addr() -> str:
    """First host of the Slurm allocation (what torchrun's rendezvous would pick)."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # a single host name needs no expansion; a compressed list like node[1-4] without scontrol cannot be read
        if "[" in nodelist:
            raise RuntimeError(
                f"cannot expand SLURM_JOB_NODELIST={nodelist} without scontrol; set MASTER_ADDR explicitly"
            ) from None
        return nodelist.split(",")[0]


def export_launcher_env() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from submitit, or from the SLURM_* variables
    of a bare `srun` (one task per GPU), when torchrun did not."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if under_submitit():
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return
    # read by hand rather than with submitit's TorchDistributedEnvironment: submitit is an optional extra
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:  # setdefault would read the node list even when it is given
            os.environ["MASTER_ADDR"] = _slurm_master_addr()
        # every task of the job derives the same port from the job id
        job_id = os.environ.get("SLURM_JOB_ID", "0")
        os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job_id.encode()) % 20000))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) if there is more than one process."""
    export_launcher_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """DDP or FSDP (`strategy`: run.parallel; fully_shard, parameters sharded across ranks) around `model`; as is on
    one process."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    # shard block by block, then the rest: each block's parameters are gathered just for its own forward
    for module in model.modules():
        if type(module).__name__ == "SwinTransformerV2Block":
            fully_shard(module)
    fully_shard(model)
    return model


def all_reduce_sum_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a device tensor: NCCL reduces nothing else); returns it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_model_state_dict(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's state dict: gathered from the shards under FSDP (a collective: every rank calls it)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: rank 0 receives the full tensors on the CPU, the other ranks an empty dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for small things such as RNG states)."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class Preempted(Exception):
    """A stop signal arrived; a checkpoint at `step` was saved. `exit_code` is what a process killed by that signal
    reports (143 for SIGTERM, 130 for Ctrl-C): the job did not finish, and schedulers and shells read it so."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        super().__init__(f"received {signal_name}: saved a checkpoint at step {step}; start the same run to resume")
        self.step = step
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM)


def stop_signals() -> tuple[int, ...]:
    """SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (many clusters' pre-emption / time-limit warning), SIGUSR2 and submitit's
    (SUBMITIT_PREEMPT_SIGNAL)."""
    names = ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    return tuple(dict.fromkeys(getattr(signal, name) for name in names if hasattr(signal, name)))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Data workers ignore the stop signals: `scancel` and Slurm's time limit signal every process of the job, and a
    worker dying of it would take the run down mid-step; ignoring it, workers serve batches until the main process
    has saved."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


def _end_daemonic_children() -> None:
    # multiprocessing ends daemonic children at exit with SIGTERM and then waits for them; loader workers ignore
    # SIGTERM (ignore_stop_signals), so a process leaving with live workers (e.g. an error that keeps the loader
    # referenced from its traceback) would wait forever. Daemonic children are ended at exit anyway: SIGKILL them,
    # with torch's SIGCHLD handler (which raises when a loader worker is killed) out of the way first.
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class LoaderWorkerInit:
    """DataLoader worker_init_fn: the worker ignores the stop signals and never outlives the main process, however
    that ends. Build it in the process that iterates the loader (the workers' parent): that process then ends live
    daemonic workers when it exits, before multiprocessing's own exit handler waits for them."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()
        atexit.unregister(_end_daemonic_children)  # once, however many loaders; atexit runs last-in first-out:
        atexit.register(_end_daemonic_children)  # before multiprocessing's

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        # the kernel SIGKILLs this worker as soon as its parent dies: ignoring SIGTERM, it would outlive a parent
        # killed with SIGKILL or dying on an error
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG (linux/prctl.h)
        except (OSError, AttributeError):  # no libc prctl (not Linux, a static build): torch's own watchdog remains
            return
        if os.getppid() != self.parent_pid:  # the parent died before the request: no signal will come
            os._exit(1)


class StopSignal:
    """Turns the stop signals into a flag the loop checks between steps; a second Ctrl-C stops at once.

    The ranks stop at the same step: `should_stop()` all-reduces the signal number on a gloo group, a CPU
    collective that never waits on the GPU stream. A handler installed before (submitit's: on SIGUSR2 rank 0
    requeues the job and exits) is deferred: `hand_over()` calls it once the checkpoint is written."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.received: int | None = None
        self._group = dist.new_group(backend="gloo") if info.distributed else None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in stop_signals()}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        if signum == signal.SIGINT and self.info.is_main and self.received is None:
            log.info("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank has received one of the signals; every rank then knows which."""
        received = self.received or 0
        if self._group is not None:  # asked every step: one process needs no tensor
            flag = torch.tensor([received])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())  # a CPU tensor: no device sync
        if received:
            self.received = received
        return bool(received)

    @property
    def name(self) -> str:
        """The signal that stopped the run, e.g. SIGTERM."""
        return signal.Signals(self.received).name if self.received else "no signal"

    def hand_over(self) -> None:
        """Once every rank is past the checkpoint, call the handler the signal had before (a Python function)."""
        if self._group is not None:
            # rank 0 may still be writing the checkpoint: no rank exits (the launcher would kill the job) before then
            dist.barrier(group=self._group)
        previous = self._previous.get(self.received)
        # Python's own SIGINT handler would raise KeyboardInterrupt over the clean exit
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)

    def restore(self) -> None:
        """Put back the previous handlers."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def under_submitit() -> bool:
    """This process was started by submitit (Hydra's submitit launcher), which requeues its jobs itself."""
    return "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_FOLDER" in os.environ


def requeue_slurm_job(signum: int | None) -> bool:
    """Put this sbatch job (not submitit's) back in the queue after the checkpoint of a stop by SIGTERM / SIGUSR1,
    unless it was cancelled (`scancel` sends the same SIGTERM); returns whether it was requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    # the time-limit warning (--signal=TERM@120 or USR1@120) and pre-emption; not Ctrl-C, nor submitit's own signal
    if not job_id or signum not in (signal.SIGTERM, signal.SIGUSR1) or under_submitit():
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # a state that cannot be read: requeue
        job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
        if "JobState=CANCELLED" in job.stdout:
            log.info(f"Slurm job {job_id} was cancelled: not requeued")
            return False
    try:
        subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        log.warning(
            f"could not requeue Slurm job {job_id} ({detail[-1] if detail else type(e).__name__}); submit the same "
            "command again to resume from the checkpoint"
        )
        return False
    log.info(f"requeued Slurm job {job_id}: it resumes from this checkpoint when it starts again")
    return True


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[torch.device, DistInfo, StopSignal]]:
    """For one run: join the job's process group and watch the stop signals; yields (this process's device,
    DistInfo, StopSignal). After Preempted (the checkpoint is saved) hand over the signal and requeue the job."""
    info = init_distributed(device)
    stop = StopSignal(info)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)  # one process per GPU
    try:
        yield device, info, stop
    except Preempted:
        stop.hand_over()  # the checkpoint is on disk: now submitit may requeue (and exit)
        if info.is_main:
            requeue_slurm_job(stop.received)
        raise
    finally:
        stop.restore()
        cleanup(info)
