"""Where the command-line tools find the Hydra configs."""

from pathlib import Path

# conf/ sits at the repository root next to the package (an editable install, as launch/*.sh does)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
