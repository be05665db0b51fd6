"""Builders several test modules share: a two-class image folder, a tiny fine-tuning config, a fake `scontrol`, a
file whose writes misbehave.

Imported as `from builders import ...` (pytest puts tests/ on sys.path: it holds conftest.py and no packages).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# a 3-stage 16-wide SwinV2 at 32 px / window 4 (stage windows 4, 4, 2)
PICO_MODEL = dict(arch="pico", img_size=32, window_size=4, drop_path_rate=0.0)


def write_two_class_images(root: Path, counts: Mapping[str, tuple[int, int]], size: int = 36) -> Path:
    """root/<split>/class_<c>/<k>.png: counts[split][c] noisy images per class, class 1 brighter than class 0."""
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for c, count in enumerate(per_class):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 100, size=(size, size, 3)) + 120 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")
    return root


def tiny_finetune_config(output_dir: Path, image_root: Path, **sections: Any) -> Any:
    """A FinetuneConfig of the pico model on `image_root` (no mixup / augmentation, 2 epochs, CPU); each keyword is
    a section whose keys replace the defaults' (a non-dict value replaces the whole section)."""
    from simmim_swin.config import FinetuneConfig, from_dict

    base: dict[str, Any] = dict(
        model=PICO_MODEL,
        data=dict(root=str(image_root), batch_size=4, eval_batch_size=4, num_workers=0),
        augment=dict(mixup=0.0, cutmix=0.0, rand_augment=None, reprob=0.0),
        optim=dict(base_lr=0.1, warmup_lr=0.001, min_lr=0.001),
        schedule=dict(epochs=2, warmup_epochs=1, kind="cosine"),
        logger=dict(log_every=1),
        run=dict(output_dir=str(output_dir), name="scratch", device="cpu"),
    )
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return from_dict(FinetuneConfig, base)


def fake_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """(bin folder, call log): an `scontrol` that records its arguments and reports every job in the state
    $FAKE_JOB_STATE (RUNNING when unset)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:3] == ['show', 'job']:\n"
        "    state = os.environ.get('FAKE_JOB_STATE', 'RUNNING')\n"
        "    print(f'JobId={sys.argv[-1]} JobName=simmim-swin JobState={state} Reason=None')\n"
    )
    script.chmod(0o755)
    return bin_dir, calls


class PatchedWrites:
    """A file whose write() is `write(file, data)` (slow storage, a full disk); everything else is the real file's."""

    def __init__(self, file: Any, write: Callable[[Any, Any], int]) -> None:
        self.file, self._write = file, write

    def write(self, data: Any) -> int:
        return self._write(self.file, data)

    def __enter__(self) -> PatchedWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)
