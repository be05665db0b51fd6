"""Helpers shared by the command-line tools."""

from __future__ import annotations

from pathlib import Path

# conf/ sits at the repository root next to the package (an editable install, as launch/*.sh does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
