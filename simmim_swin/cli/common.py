"""Helpers shared by the command-line tools."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import find_latest_checkpoint

# conf/ sits at the repository root next to the package (an editable install, as launch/*.sh does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no checkpoints (looked in {path / 'checkpoints'})")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path
