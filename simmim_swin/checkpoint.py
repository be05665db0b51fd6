"""Training checkpoints: atomic save, keep-last-k with a `latest` pointer, auto-resume lookup, RNG state. Layout:
<run_dir>/checkpoints/step_00001000.pt (step_00001000.dcp/ for FSDP) ... and `latest`, a text file naming the newest;
only tensors and plain types, so they load with weights_only=True."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import DistInfo, all_gather_objects
from .files import atomic_write, fsync_dir

CHECKPOINT_DIR = "checkpoints"
LATEST_POINTER = "latest"
# step_N.pt: a whole-model checkpoint (one process or DDP); step_N.dcp/: a sharded one (FSDP), a folder written
# by every rank through torch.distributed.checkpoint plus meta.pt (step, config, RNG states) from rank 0
_STEP_FILE = re.compile(r"step_(\d+)\.(pt|dcp)")
SHARDED_META = "meta.pt"
# safetensors metadata keys written by `simmim-swin export`: the layout, and the JSON of what rebuilds the model
EXPORT_FORMAT_KEY = "format"
EXPORT_CONFIG_KEY = "simmim_swin"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save `state` to `path` atomically (temp file, fsync, rename, fsync of the folder)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def _step_files(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_FILE.fullmatch(path.name)
        if match and (path.is_file() or (path / SHARDED_META).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_and_prune(run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Save run_dir/checkpoints/step_{step:08d}.pt, point `latest` at it, delete all but the newest keep_last."""
    path = save_checkpoint(Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt", state)
    _point_latest_and_prune(path, keep_last)
    return path


def _point_latest_and_prune(path: Path, keep_last: int) -> None:
    atomic_write(path.parent / LATEST_POINTER, path.name)
    files = _step_files(path.parent)
    for _, old in files[: max(len(files) - keep_last, 0)]:
        if old == path:  # even if an older run left higher steps behind
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def load_sharded_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a step_N.dcp folder into `model` (FSDP-sharded or not, any world size) and `optimizer`; returns meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = [] if optimizer is None else [optimizer]
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        # loading without a process group (resuming an FSDP run in one process) is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_checkpoint(Path(path) / SHARDED_META)


def _consolidate_sharded_model(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    # the public way to read a DCP folder without the model that wrote it (the optimizer state it converts is dropped)
    with tempfile.TemporaryDirectory(prefix="simmim-dcp-") as tmp:
        whole = Path(tmp) / "checkpoint.pt"
        try:
            dcp_to_torch_save(str(path), str(whole))
        except Exception as e:
            raise ValueError(
                f"sharded checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is incomplete or corrupt. "
                + _what_to_do(path)
            ) from e
        return torch.load(whole, map_location="cpu", weights_only=True)["model"]


def check_total_batch(state: dict, total_batch: int, path: str | Path, images_per_batch_size: int) -> None:
    """Refuse to resume with another total batch (the step count, schedule and lr follow it); images_per_batch_size:
    processes x optim.accum_steps, what one unit of data.batch_size adds to the total."""
    saved = state.get("total_batch")
    if saved is None or saved == total_batch:  # checkpoints from before the total batch was recorded pass
        return
    keep = (
        f"data.batch_size={saved // images_per_batch_size}"
        if saved % images_per_batch_size == 0
        else "data.batch_size x processes x optim.accum_steps as before"
    )
    raise ValueError(
        f"{path} was trained with a total batch of {saved} images per step, this run has {total_batch} "
        f"(data.batch_size x processes x optim.accum_steps); the step count and lr follow it. Resume with {keep}, "
        "or start a new run with run.name=<new name>"
    )


def read_resume_meta(path: str | Path) -> dict:
    """What a resume checks before loading any weights: meta.pt of a step_N.dcp folder, a step_N.pt whole."""
    path = Path(path)
    return load_checkpoint(path / SHARDED_META if path.is_dir() else path)


def restore_training_state(
    path: str | Path, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, rank: int, sharded: bool,
) -> None:  # fmt: skip
    """Load the model, optimizer, scaler and this rank's RNG state of checkpoint `path` (meta `state`)."""
    if Path(path).is_dir():  # step_N.dcp
        load_sharded_checkpoint(path, model, optimizer)
    elif sharded:
        raise ValueError(f"{path} is a whole-model checkpoint; resume it with run.parallel=ddp")
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    # one RNG state per rank; a run resumed on a different number of processes reuses them round-robin
    restore_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng)


def save_training_state(
    run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
    keep_last: int, info: DistInfo, sharded: bool,
) -> None:  # fmt: skip
    """Every rank calls it: rank 0 writes step_N.pt (`model` unwrapped, uncompiled), or under FSDP all step_N.dcp/."""
    meta = {**meta, "rng": all_gather_objects(capture_rng_state(), info)}
    if not sharded:
        if info.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
            save_and_prune(run_dir, step, state, keep_last=keep_last)
        return
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / f"step_{step:08d}.dcp"
    tmp = folder / f".step_{step:08d}.dcp.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # FSDP runs in a process group: the other ranks wait for the clean folder
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    dist.barrier()
    # renamed once every rank is done and meta.pt is in: a crash never leaves a partial folder that a resume picks
    if info.is_main:
        save_checkpoint(tmp / SHARDED_META, meta)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_dir(folder)
        _point_latest_and_prune(path, keep_last)
    dist.barrier()


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it exists, else the highest step, else None."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    files = _step_files(folder)
    pointer = folder / LATEST_POINTER
    if pointer.is_file():
        # Only a bare file name inside the checkpoint folder, naming a complete checkpoint, is trusted.
        target = folder / Path(pointer.read_text().strip()).name
        if any(path == target for _, path in files):
            return target
    return files[-1][1] if files else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint or weights file as given, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir() and not (path / SHARDED_META).is_file():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no checkpoints (looked in {path / CHECKPOINT_DIR})")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory or a checkpoint file")
    return path


def _what_to_do(path: Path) -> str:
    step_file = path if _STEP_FILE.fullmatch(path.name) else path.parent
    if step_file.parent.name == CHECKPOINT_DIR and _STEP_FILE.fullmatch(step_file.name):
        return f"Delete {step_file} to resume from an older checkpoint."
    return "Check the path, or copy or export the file again."


def load_weights_file(path: str | Path) -> dict:
    """A checkpoint's contents, or a .safetensors file read as one (with what a `simmim-swin export` records)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    # not timm's load_state_dict: it returns the weights alone, without the config and windows stored beside them
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); check the path, or write it again with "
            "`simmim-swin export`"
        ) from e
    state = {"model": tensors, "export_format": metadata.get(EXPORT_FORMAT_KEY, "unknown")}
    if EXPORT_CONFIG_KEY in metadata:
        info = json.loads(metadata[EXPORT_CONFIG_KEY])
        keys = ("step", "stage_window_sizes", "num_classes", "class_names")
        state.update({key: info[key] for key in keys if info.get(key) is not None})
        state["config"] = {"model": info["model"]}
        state["pretrained_window_sizes"] = info["model"].get("pretrained_window_sizes")
    return state


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) to the CPU, errors naming the file; a step_N.dcp folder gives its whole model."""
    path = Path(path)
    if (path / SHARDED_META).is_file():
        return {**load_checkpoint(path / SHARDED_META), "model": _consolidate_sharded_model(path)}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path or the run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated, corrupt or holds "
            f"objects that weights_only=True refuses. {_what_to_do(path)}"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch CPU and all CUDA generators, as plain types that weights_only=True loads."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # the key, an ndarray: stored as a list
    numpy_state = dict(bit_generator=np_name, key=np_key.tolist(), pos=np_pos, has_gauss=np_has_gauss, gauss=np_gauss)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what capture_rng_state saved; CUDA states are skipped on a machine without CUDA."""
    py, np_state = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    key = np.asarray(np_state["key"], dtype=np.uint32)
    np.random.set_state((np_state["bit_generator"], key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # resuming on fewer visible devices restores the ones present (loaded to the CPU, as set_rng_state wants)
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
