"""The `simmim-swin` command line: options anywhere among a sub-command's positionals."""

from __future__ import annotations

import pytest

from simmim_swin.cli.tools import parse_args


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "RUN", "--format", "hf", "DIR"],
        ["export", "--format", "hf", "RUN", "DIR"],
        ["export", "RUN", "DIR", "--format", "hf"],
    ],
)
def test_export_takes_options_between_its_positionals(argv):
    args = parse_args(argv)
    assert (args.command, args.checkpoint, args.out, args.format) == ("export", "RUN", "DIR", "hf")


def test_options_between_positionals_of_every_command():
    args = parse_args(["plot", "run_a", "--out", "c.png", "run_b"])
    assert args.runs == ["run_a", "run_b"] and args.out == "c.png"
    args = parse_args(["make-shards", "--out", "shards", "images", "--labels"])
    assert args.folder == "images" and args.labels
    args = parse_args(["check-data", "--in-chans", "4", "tiles"])
    assert args.path == "tiles" and args.in_chans == 4


def test_unknown_command_and_missing_positional_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["exprot", "RUN"])
    assert exc.value.code == 2 and "invalid choice: 'exprot'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parse_args(["inspect"])
    assert exc.value.code == 2 and "simmim-swin inspect" in capsys.readouterr().err
