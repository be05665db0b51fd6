"""`--help` of simmim-pretrain / simmim-finetune lists that command's groups and presets; a group of the other
command, an unknown key or a mistyped value is answered in one line, before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_main

from simmim_swin.cli.common import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


HELP_SCRIPT = """
import sys
from simmim_swin.cli.{module} import main
for args in {calls!r}:
    sys.argv = ['x', *args]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    print('=== end ===')
print('loaded:', sorted(m for m in ('torch', 'timm', 'simmim_swin.models') if m in sys.modules))
"""


def help_texts(tmp_path: Path, module: str, *calls: list[str]) -> list[str]:
    """Each `--help` call's output, all in ONE fresh interpreter (one per console script), which must not have
    loaded torch, timm or the model code by the end: --help answers in seconds on a busy machine."""
    code = HELP_SCRIPT.format(module=module, calls=list(calls))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded: []"
    texts = result.stdout.split("=== end ===\n")[:-1]
    assert len(texts) == len(calls)
    return texts


@pytest.mark.slow
def test_pretrain_help_lists_its_groups_and_presets_only_without_torch(tmp_path):
    (out,) = help_texts(tmp_path, "pretrain", ["--help"])
    for group in ("experiment", "data", "schedule", "logger", "probe"):
        assert f"\n  {group} " in out
        for option in options(group):
            assert option in out, (group, option)
    for option in options("hydra/launcher"):
        assert option in out
    assert "simmim-pretrain experiment=quickstart" in out  # examples
    assert "\n  finetune " not in out and "swinv2_base_w14_224" not in out  # fine-tuning presets are not here
    assert "model:\n  arch: base" in out  # the composed config


@pytest.mark.slow
def test_finetune_help_lists_its_groups_and_presets_only_without_torch(tmp_path):
    (out,) = help_texts(tmp_path, "finetune", ["--help"])
    for group in ("finetune", "logger"):
        assert f"\n  {group} " in out
        for option in options(group):
            assert option in out, (group, option)
    assert "simmim-finetune finetune=quickstart" in out
    assert "\n  experiment " not in out and "swinv2_base_w12_192_800ep" not in out
    assert "augment:\n  rand_augment:" in out


@pytest.mark.slow
def test_tools_help_without_torch(tmp_path):
    for text in help_texts(tmp_path, "tools", ["--help"], ["export", "--help"], ["check-data", "--help"]):
        assert "usage: simmim-swin" in text.lower()


@pytest.mark.parametrize(
    ("module", "arg", "expected"),
    [
        ("pretrain", "finetune=quickstart", "run `simmim-finetune finetune=quickstart ...`"),
        ("finetune", "experiment=quickstart", "run `simmim-pretrain experiment=quickstart ...`"),
        ("finetune", "data=folder", "data.source=folder data.root=DIR"),
        ("pretrain", "optim.lr=0.1", "unknown key optim.lr"),
        ("pretrain", "model.img_size=big", "model.img_size='big' must be a positive int"),
        ("finetune", "augment.mixupp=0.5", "unknown key augment.mixupp"),
        ("finetune", "train.ema=maybe", "train.ema: Value 'maybe'"),
        ("pretrain", "data=nowhere", "Could not find 'data/nowhere'"),
    ],
)
def test_wrong_arguments_get_one_line(tmp_path, module, arg, expected):
    result = run_main(module, arg, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pretrain", "finetune"])
def test_help_into_a_closed_pipe_ends_without_an_error_line(tmp_path, module):
    """`simmim-finetune --help | head -1`: the reader leaves before the help is written; no `error:` line follows."""
    cmd = [sys.executable, "-m", f"simmim_swin.cli.{module}", "--help"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    proc.stdout.close()  # before the process has started: its first write finds no reader
    _, stderr = proc.communicate(timeout=300)
    assert "error" not in stderr.lower() and "Traceback" not in stderr, stderr
