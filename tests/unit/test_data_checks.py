"""Files that used to pass unnoticed: 16-bit colour PNGs read as 8-bit, NaN / Inf pixels, channels-last .npy,
sets that mix bit depths or band counts, files skipped for their extension; each is read in full or named."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from simmim_swin.cli.tools import main as tools_main
from simmim_swin.data import (
    BadSample,
    ImageFiles,
    MaskedImages,
    PretrainCrop,
    open_source,
    to_tensor,
    write_shards,
)
from simmim_swin.data.images import describe_source, source_depth
from simmim_swin.data.shards import ShardSample
from simmim_swin.masking import MaskGenerator

IMG = 32


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG of (H, W, C) uint16 (C = 1, 2, 3, 4), written by hand with zlib; the rows cycle
    through all five PNG filters, so a reader that unfilters with the wrong pixel stride gets wrong values."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int64)  # H, row bytes
    stride = 2 * channels  # bytes per pixel: the filters' "left" neighbour
    raw = bytearray()
    previous = np.zeros_like(rows[0])
    for y, row in enumerate(rows):
        left = np.concatenate([np.zeros(stride, np.int64), row[:-stride]])
        upper_left = np.concatenate([np.zeros(stride, np.int64), previous[:-stride]])
        kind = y % 5
        predictor = [0 * row, left, previous, (left + previous) // 2, _paeth(left, previous, upper_left)][kind]
        raw += bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes()
        previous = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _random16(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16bit_colour_png_keeps_every_bit(tmp_path, channels):
    pixels = _random16((12, 10, channels))
    data = png16(pixels)
    (tmp_path / "deep.png").write_bytes(data)
    assert Image.open(tmp_path / "deep.png").mode in ("RGB", "RGBA")  # what PIL alone gives: 8 bits per sample
    expected = pixels.transpose(2, 0, 1)
    from_file, from_member = open_source(tmp_path / "deep.png"), open_source(data, "png")
    assert from_file.dtype == np.uint16 and np.array_equal(from_file, expected)
    assert np.array_equal(from_member, expected)  # a shard member
    tensor = to_tensor(open_source(tmp_path / "deep.png"), channels)
    assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(expected.astype(np.float32)))
    assert describe_source(from_file, ".png") == f"PNG {channels} bands 16-bit int"


def test_the_depth_of_a_pil_image_comes_from_its_mode_without_decoding(tmp_path):
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "g16.png")
    lazy = open_source(tmp_path / "g16.png")
    assert describe_source(lazy) == "PNG I;16 1 band 16-bit int" and lazy.fp is not None  # not decoded
    depths = [source_depth(Image.new(mode, (2, 2))) for mode in ("1", "P", "RGBA", "I", "F")]
    assert depths == ["8-bit int", "8-bit int", "8-bit int", "32-bit int", "32-bit float"]


def test_check_data_reports_the_depth_of_a_16bit_colour_png(tmp_path, capsys):
    (tmp_path / "deep.png").write_bytes(png16(_random16((8, 8, 3))))
    tools_main(["check-data", str(tmp_path), "--workers", "1"])
    out = capsys.readouterr().out
    assert "PNG 3 bands 16-bit int" in out and "8-bit" not in out and "no bad files" in out


def _nan_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    good = rng.random((2, 16, 16)).astype(np.float32)
    np.save(root / "good.npy", good)
    nan = good.copy()
    nan[1, 3, 4] = np.nan
    np.save(root / "nan.npy", nan)
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    tifffile.imwrite(root / "inf.tif", inf, photometric="minisblack")
    return good


def test_nan_and_inf_pixels_are_bad_samples_named_by_every_reader(tmp_path, capsys):
    root = tmp_path / "floats"
    good = _nan_folder(root)
    with pytest.raises(ValueError, match=r"1 NaN and 0 infinite pixel values \(band 1\)"):
        to_tensor(open_source(root / "nan.npy"), 2)
    with pytest.raises(ValueError, match=r"0 NaN and 1 infinite"):
        to_tensor(open_source(root / "inf.tif"), 2)
    # a run: the dataset gives a BadSample naming the file, which the bad-sample policy counts and names once
    masks = MaskGenerator(input_size=IMG, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)
    dataset = MaskedImages(ImageFiles(root), PretrainCrop(IMG, in_chans=2), masks)
    items = {path.name: dataset[i] for i, path in enumerate(dataset.images.paths)}
    assert isinstance(items["nan.npy"], BadSample) and "NaN" in items["nan.npy"].reason
    assert isinstance(items["inf.tif"], BadSample) and items["inf.tif"].path.endswith("inf.tif")
    assert not isinstance(items["good.npy"], BadSample) and torch.isfinite(items["good.npy"][0]).all()

    with pytest.raises(SystemExit) as exit_info:
        tools_main(["check-data", str(root), "--workers", "1"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "2 bad" in out
    assert "nan.npy: ValueError: the image holds 1 NaN" in out and "inf.tif: ValueError" in out

    tools_main(["stats", str(root), "--workers", "1"])
    captured = capsys.readouterr()
    assert "nan" not in captured.out.replace("nan.npy", "")  # the statistics are finite
    assert "2 images left out" in captured.err and "nan.npy" in captured.err and "inf.tif" in captured.err
    mean = [float(v) for v in captured.out.split("data.mean=[")[1].split("]")[0].split(",")]
    np.testing.assert_allclose(mean, good.mean(axis=(1, 2)), rtol=1e-5)


def test_channels_last_npy_is_named_as_such(tmp_path):
    np.save(tmp_path / "hwc.npy", np.zeros((48, 48, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"hwc\.npy: shape \(48, 48, 3\) looks channels-last.*np\.moveaxis"):
        open_source(tmp_path / "hwc.npy")
    np.save(tmp_path / "hwc13.npy", np.zeros((40, 40, 13), dtype=np.float32))  # too many bands to tell by shape
    with pytest.raises(ValueError, match=r"model.in_chans=13 matches its last axis: it looks channels-last"):
        to_tensor(open_source(tmp_path / "hwc13.npy"), 13)
    np.save(tmp_path / "chw.npy", np.zeros((3, 48, 48), dtype=np.float32))
    assert open_source(tmp_path / "chw.npy").shape == (3, 48, 48)


def test_check_data_warns_about_mixed_depths_and_bands_and_names_unread_files(tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "rgb.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "grey.png")
    tifffile.imwrite(root / "deep.tif", np.zeros((8, 8), np.uint16))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "anim.gif")
    (root / "notes.txt").write_text("x")
    tools_main(["check-data", str(root), "--workers", "1"])
    out = capsys.readouterr().out
    assert "no bad files" in out
    assert "warning: the images mix bit depths (8-bit int: 2, 16-bit int: 1)" in out
    assert "warning: the images mix band counts (1 band: 2, 3 bands: 1)" in out
    assert "note: 2 files not read (extensions .gif: 1, .txt: 1)" in out and "anim.gif" in out
    tools_main(["check-data", str(root), "--workers", "1", "--in-chans", "3"])
    out = capsys.readouterr().out
    assert "mix bit depths" in out and "mix band counts" not in out  # every image gives 3 channels


def test_make_shards_decodes_before_packing_and_names_what_it_skips(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{name}.jpg", quality=90)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    assert Image.open(root / "truncated.jpg").size == (64, 64)  # the header reads fine: only decoding fails
    Image.new("L", (40, 40)).save(root / "bomb.png")  # over the --max-image-pixels given below
    np.save(root / "nan.npy", np.full((3, 24, 24), np.nan, dtype=np.float32))
    (root / "anim.gif").write_bytes(b"GIF89a")
    out = tmp_path / "shards"
    pixel_limit = Image.MAX_IMAGE_PIXELS
    tools_main(["make-shards", str(root), "--out", str(out), "--max-image-pixels", "1000", "--workers", "1"])
    assert pixel_limit == Image.MAX_IMAGE_PIXELS  # PIL's process-wide limit is the tool's only while it runs
    captured = capsys.readouterr()
    index = json.loads((out / "train.json").read_text())
    assert index["total"] == 2 and "(3 unreadable files skipped)" in captured.out
    for name, reason in [("truncated.jpg", "truncated"), ("bomb.png", "max_image_pixels=1000"), ("nan.npy", "NaN")]:
        line = next(ln for ln in captured.err.splitlines() if name in ln)
        assert line.startswith("skipped (a run would skip it): ") and reason in line, line
    assert "note: 1 file not read (extensions .gif: 1)" in captured.err


def test_make_shards_removes_the_partial_folder_a_killed_run_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="simmim_swin")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    out = tmp_path / "shards"
    killed = out / f".train.partial-{host}-{int(dead.stdout)}-k1ll3d"  # its process is gone
    running = out / f".train.partial-{host}-{os.getpid()}-l1v3"  # a live process: another run still writing
    older = out / ".train.partial-abc123_x"  # written before the process id was part of the name
    other_set = out / f".val.partial-{host}-{int(dead.stdout)}-v4l"  # another set: left for its own next run
    for folder in (killed, running, older, other_set):
        folder.mkdir(parents=True)
        (folder / "train-000000.tar").write_bytes(b"partial")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    write_shards([ShardSample("a", buffer.getvalue(), "png")], out)
    assert not killed.exists() and not older.exists() and running.is_dir() and other_set.is_dir()
    err = caplog.text
    assert f"removed {killed}" in err and f"removed {older}" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["train-000000.tar", "train.json"]


def _class_folder(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "x.png")


def test_finetuning_folders_with_one_class_or_an_empty_val_are_named(tmp_path):
    from simmim_swin.config import AugmentConfig, FinetuneDataConfig
    from simmim_swin.data.classification import build_train_dataset, build_val_dataset

    _class_folder(tmp_path / "one" / "train", ["cats"])
    _class_folder(tmp_path / "one" / "val", ["cats"])
    one = FinetuneDataConfig(source="folder", root=str(tmp_path / "one"))
    with pytest.raises(
        ValueError,
        match=r"training folder \(train/ of data.root=.*one\) has one class sub-folder, "
        r"'cats': a classifier of one class scores 100 %",
    ):
        build_train_dataset(one, IMG, AugmentConfig())

    _class_folder(tmp_path / "two" / "train", ["cats", "dogs"])
    (tmp_path / "two" / "val").mkdir()
    empty_val = FinetuneDataConfig(source="folder", root=str(tmp_path / "two"))
    dataset, classes = build_train_dataset(empty_val, IMG, AugmentConfig())
    assert classes == ["cats", "dogs"] and len(dataset) == 2
    with pytest.raises(ValueError, match=r"validation folder .*two/val \(val/ of data.root=.*two\) holds no images"):
        build_val_dataset(empty_val, IMG)
    (tmp_path / "else" / "cats").mkdir(parents=True)  # a class folder with no image in it
    apart = FinetuneDataConfig(source="folder", root=str(tmp_path / "two" / "train"), val_root=str(tmp_path / "else"))
    with pytest.raises(ValueError, match=r"validation folder .*else \(data.val_root=.*else\) holds no images"):
        build_val_dataset(apart, IMG)
