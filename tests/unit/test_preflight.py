"""Every bad value of a command line is refused at the door, in one line naming the key: by Hydra's composition
(Enum-typed choices, types, unknown keys) or by the preflight callback (cli/preflight.py), both before Hydra makes
the run directory. In-process: the composition and `validate_composed` the callback runs, one key after another
(tests/unit/test_cli_common.py runs whole commands and checks that no directory is left)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from simmim_swin.cli.common import CONF_DIR, composition_error
from simmim_swin.cli.preflight import validate_composed
from simmim_swin.config import ConfigError

TINY = ["model.arch=pico", "model.img_size=32", "model.window_size=4", "mask.mask_patch_size=8"]


def refusal(command: str, *overrides: str) -> str | None:
    """The one line a command ends with for these arguments, or None when the config passes the door."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=command, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:  # what run_hydra turns into one line
        return composition_error(e)
    try:
        validate_composed(cfg, command)
    except ConfigError as e:
        return str(e)
    return None


# (command, arguments, what the line must say): every Enum-typed field, then the checks that moved to the door
REFUSED = [
    ("pretrain", ["data.source=ftp"], "data.source='ftp' is unknown; use one of ['photos', 'folder', 'fashion_mnist'"),
    ("pretrain", ["data.split=val"], "data.split='val' is unknown; use one of ['train', 'test']"),
    ("pretrain", ["schedule.kind=linear"], "schedule.kind='linear' is unknown; use one of ['cosine', 'multistep']"),
    ("pretrain", ["logger.wandb=sometimes"], "logger.wandb='sometimes' is unknown; use one of ['online', 'offline'"),
    ("pretrain", ["logger.console=of"], "logger.console='of' is unknown; use one of ['auto', 'wrap', 'redirect'"),
    ("pretrain", ["run.precision=fp8"], "run.precision='fp8' is unknown; use one of ['auto', 'fp32', 'bf16', 'fp16']"),
    ("pretrain", ["run.parallel=zero3"], "run.parallel='zero3' is unknown; use one of ['ddp', 'fsdp']"),
    ("pretrain", ["probe.source=web"], "probe.source='web' is unknown; use one of ['fashion_mnist', 'folder'"),
    ("pretrain", ["init_from_format=onnx"], "init_from_format='onnx' is unknown; use one of ['auto', 'simmim'"),
    ("finetune", ["data.source=photos"], "data.source='photos' is unknown; use one of ['folder', 'fashion_mnist']"),
    ("finetune", ["pretrained_format=onnx"], "pretrained_format='onnx' is unknown; use one of ['auto', 'simmim'"),
    ("finetune", ["augment.remode=zeros"], "augment.remode='zeros' is unknown; use one of ['const', 'rand', 'pixel']"),
    ("finetune", ["augment.mixup_mode=row"], "augment.mixup_mode='row' is unknown; use one of ['batch', 'pair'"),
    ("finetune", ["train.head_init=zeros"], "train.head_init='zeros' is unknown; use one of ['random', "),
    ("finetune", ["logger.wandb=sometimes"], "logger.wandb='sometimes' is unknown"),
    # once checked by the code that used them, after the run directory existed
    ("pretrain", ["run.device=gpu"], "run.device='gpu' is unknown; use auto, cpu, cuda or cuda:N"),
    ("pretrain", ["schedule.epochs=10", "schedule.warmup_epochs=11"], "schedule.warmup_epochs=11 must lie in [0, "),
    ("pretrain", ["schedule=cosine", "schedule.epochs=10", "schedule.warmup_epochs=10"], "after warm-up"),
    ("pretrain", ["schedule.epochs=10", "schedule.decay_epochs=[12]"], "milestone 12 must lie strictly between 0"),
    ("pretrain", ["schedule.epochs=10", "schedule.warmup_epochs=5", "schedule.decay_epochs=[3]"], "inside the warm-up"),
    ("pretrain", ["optim.lr_reference_batch=0"], "optim.lr_reference_batch=0 must be >= 1"),
    ("pretrain", ["optim.betas=[0.9]"], "optim.betas=[0.9] must be two values (beta1, beta2)"),
    ("pretrain", ["data=folder"], "data.source=folder needs data.root"),
    ("pretrain", ["data.samples_per_epoch=0"], "data.samples_per_epoch=0: source=photos needs the crops per epoch"),
    ("pretrain", ["model.img_size=big"], "model.img_size='big' must be a positive int"),
    ("finetune", [], "data.source=folder needs data.root"),
    ("finetune", ["data.root=imgs", "train.layer_decay=1.5"], "train.layer_decay=1.5 must lie in (0, 1]"),
    ("finetune", ["data.root=imgs", "data.crop_pct=0"], "data.crop_pct=0.0 must lie in (0, 1]"),
    ("finetune", ["data.root=imgs", "augment.crop_scale=[0.5,2]"], "augment.crop_scale=[0.5, 2.0] must be [min, max]"),
    ("finetune", ["data.root=imgs", "schedule.warmup_epochs=200"], "schedule.warmup_epochs=200 must lie in [0, "),
    ("finetune", ["evaluate=run", "data.root=imgs", "run.device=tpu"], "run.device='tpu' is unknown"),
]


@pytest.mark.parametrize(("command", "overrides", "expected"), REFUSED)
def test_a_bad_value_is_refused_at_the_door_in_one_line(command, overrides, expected):
    line = refusal(command, *(TINY if command == "pretrain" else []), *overrides)
    assert line is not None and "\n" not in line and expected in line, line


def test_good_values_pass_the_door():
    assert refusal("pretrain", *TINY) is None
    assert refusal("pretrain", *TINY, "data.source=fashion_mnist", "data.split=test", "run.precision=bf16") is None
    assert refusal("finetune", "data.root=imgs", "augment.mixup_mode=elem", "train.head_init=linear_probe") is None
    # an evaluation trains nothing: an odd batch with mixup passes
    assert refusal("finetune", "evaluate=run", "data.source=fashion_mnist", "data.batch_size=3") is None
