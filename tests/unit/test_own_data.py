"""Users' own files: 16-bit / float / multi-band images read without clipping, per-channel statistics, bad samples
skipped and counted, band panels, patch-embedding adaptation, safe shard writing, check-data and stats."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from simmim_swin.cli.tools import main as tools_main
from simmim_swin.config import (
    ConfigError,
    DataConfig,
    LoggerConfig,
    MaskConfig,
    ModelConfig,
    PretrainConfig,
    validate_pretrain,
)
from simmim_swin.data import (
    BadDataError,
    BadDataMonitor,
    BadSample,
    EvalView,
    ImageFiles,
    ImageTooLargeError,
    MaskedImages,
    Normalizer,
    PretrainCrop,
    collate_good,
    normalize_images,
    open_source,
    read_index,
    to_tensor,
    write_shards,
)
from simmim_swin.data.datasets import transform_image
from simmim_swin.data.shards import folder_samples
from simmim_swin.data.stream import open_image
from simmim_swin.figures import BandDisplay, build_display, make_panel_tiles
from simmim_swin.masking import MaskGenerator
from simmim_swin.pretrain import masked_pixel_loss

IMG = 32


@pytest.fixture()
def masks() -> MaskGenerator:
    return MaskGenerator(input_size=IMG, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)


def _ramp16(size: int = IMG) -> np.ndarray:
    """A 16-bit image covering 0..65535 (size x size distinct levels)."""
    return np.linspace(0, 65535, size * size).round().astype(np.uint16).reshape(size, size)


# ------------------------------------------------------------------------------------------------ reading pixels


def test_16bit_png_reaches_the_model_unclipped_as_raw_minus_mean_over_std(tmp_path, masks):
    raw = _ramp16()
    Image.fromarray(raw).save(tmp_path / "ramp.png")  # mode I;16
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I;16")
    # a crop of the whole image at its own size, no flip: the pixels pass through the augmentation unchanged
    crop = PretrainCrop(IMG, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, in_chans=1)
    dataset = MaskedImages(ImageFiles(tmp_path), crop, masks)
    image, mask = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (1, IMG, IMG)
    mean, std = [30000.0], [20000.0]
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, images, mask):
            seen["input"] = images
            return images.sum(), images

    masked_pixel_loss(Probe(), (image[None], mask[None]), normalize=Normalizer(mean, std))
    fed = seen["input"][0, 0]
    assert fed.unique().numel() > 256
    torch.testing.assert_close(fed, (torch.from_numpy(raw.astype(np.float32)) - 30000.0) / 20000.0)


def test_float_tiff_multipage_tiff_and_npy_keep_their_values_and_bands(tmp_path):
    values = np.array([[-3.5, 0.0], [1e-3, 7e4]], dtype=np.float32).repeat(8, 0).repeat(8, 1)
    tifffile.imwrite(tmp_path / "f.tif", values)
    assert torch.equal(to_tensor(open_source(tmp_path / "f.tif"), 1)[0], torch.from_numpy(values))
    pages = np.stack([_ramp16(16) + i for i in range(5)])  # 5 pages of 16-bit
    tifffile.imwrite(tmp_path / "pages.tif", pages)
    assert torch.equal(to_tensor(open_source(tmp_path / "pages.tif"), 5), torch.from_numpy(pages.astype(np.float32)))
    bands = np.random.default_rng(0).random((13, 20, 24)).astype(np.float32)
    np.save(tmp_path / "s2.npy", bands)
    assert torch.equal(to_tensor(open_source(tmp_path / "s2.npy"), 13), torch.from_numpy(bands))
    files = ImageFiles(tmp_path)  # a run names the file of a bad sample
    bad = transform_image(files, files.paths.index(tmp_path / "s2.npy"), lambda source: to_tensor(source, 4))
    assert bad.path.endswith("s2.npy") and "13 bands but model.in_chans=4" in bad.reason
    grey8 = np.full((10, 12), 9, dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g.png")
    three = to_tensor(open_source(tmp_path / "g.png"), 3)
    assert three.dtype == torch.uint8 and three.shape == (3, 10, 12) and (three == 9).all()  # grey fills RGB


def test_image_over_the_pixel_limit_is_refused_naming_it(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match="max_image_pixels=1000"):
        open_source(tmp_path / "big.png", max_pixels=1000)
    assert open_source(tmp_path / "big.png", max_pixels=1200).size == (40, 30)
    np.save(tmp_path / "big.npy", np.zeros((2, 40, 30), dtype=np.uint16))
    with pytest.raises(ImageTooLargeError, match="big.npy"):
        open_source(tmp_path / "big.npy", max_pixels=1000)


def test_normalizer_defaults_to_imagenet_for_uint8_and_needs_statistics_for_float():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(Normalizer()(images), normalize_images(images))  # today's behaviour, bit for bit
    with pytest.raises(ValueError, match="simmim-swin stats"):
        Normalizer()(images.float())
    stats = Normalizer([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])
    x = torch.full((1, 4, 2, 2), 5.0)
    assert torch.equal(stats(x)[0, :, 0, 0], torch.tensor([2.0, 1.5, 1.0, 0.5]))
    on_device = Normalizer([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])  # meta: a device other than the CPU's
    assert on_device(x.to("meta")).device.type == "meta" and on_device.mean.device.type == "meta"  # moved, kept
    with pytest.raises(ValueError, match="4 values but the images have 3"):
        stats(images)
    with pytest.raises(ValueError, match="data.mean and data.std go together"):
        Normalizer([1.0, 2.0, 3.0], None)


def test_eval_view_resizes_any_band_count(tmp_path):
    bands = torch.rand(13, 48, 64)
    out = EvalView(IMG, 13)(bands.numpy())
    assert out.shape == (13, IMG, IMG) and out.dtype == torch.float32


def test_config_requires_statistics_beyond_8bit_rgb_and_checks_panel_bands():
    def config(in_chans: int = 3, bands: list[int] | None = None, **data) -> PretrainConfig:
        return PretrainConfig(
            model=ModelConfig(arch="pico", img_size=32, window_size=4, in_chans=in_chans),
            mask=MaskConfig(mask_patch_size=8),
            data=DataConfig(**data),
            logger=LoggerConfig(panel_bands=bands),
        )

    for bad, match in [
        (dict(in_chans=4), "model.in_chans=4 needs data.mean and data.std"),
        (dict(in_chans=4, mean=[1.0] * 3, std=[1.0] * 3), "one per channel"),
        (dict(mean=[1.0] * 3), "go together"),
        (dict(mean=[1.0] * 3, std=[1.0, 0.0, 1.0]), "positive"),
        (dict(in_chans=4, mean=[1.0] * 4, std=[1.0] * 4, bands=[0, 4, 1]), "panel_bands"),
        (dict(in_chans=4, mean=[1.0] * 4, std=[1.0] * 4, bands=[0, 1]), "three bands"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_pretrain(config(**bad))
    validate_pretrain(config(in_chans=13, mean=[0.5] * 13, std=[0.2] * 13, bands=[3, 2, 1]))
    validate_pretrain(config())  # 8-bit RGB: ImageNet's statistics by default


# ------------------------------------------------------------------------------------------------- bad samples


def test_collate_drops_bad_samples_and_the_monitor_names_each_file_once(caplog):
    good = (torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
    batch = collate_good([good, BadSample("/d/x.jpg", "OSError: truncated"), good])
    assert batch.data[0].shape == (2, 3, 2, 2) and batch.num_bad == 1 and batch.bad_shards == ("/d/x.jpg",)
    monitor = BadDataMonitor(max_bad_fraction=0.5, check_after=1, name_files=True)
    monitor.update(batch)
    monitor.update(batch)  # the same file again in the next epoch: counted, not named again
    assert monitor.num_bad == 2 and caplog.text.count("/d/x.jpg") == 1
    strict = BadDataMonitor(max_bad_fraction=0.0, check_after=1000, name_files=True)
    with pytest.raises(BadDataError, match=r"Bad samples per file: /d/x\.jpg \(1\)"):
        strict.update(batch)
    # with several ranks the decision waits for the all-reduced counts, taken at the same step on every rank
    ranks = BadDataMonitor(max_bad_fraction=0.0, check_after=10, world_size=2, name_files=True)
    ranks.update(batch)
    with pytest.raises(BadDataError, match=r"1 of 3 samples read \(all ranks\)"):
        ranks.check(1, 3)
    only_bad = collate_good([BadSample("/d/y.png", "x")])
    assert only_bad.data == () and only_bad.num_bad == 1


# ---------------------------------------------------------------------------------------------------- panels


def test_band_display_picks_bands_and_stretches_per_image():
    images = torch.randn(2, 13, 8, 8)
    images[:, 5] = images[:, 5] * 1000 + 5000  # a band of another scale: stretched to the full range anyway
    display = BandDisplay([5, 2, 0])
    lo, hi = display.ranges(images)
    rgb = display(images, lo, hi)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8 and rgb[..., 0].max() == 255 and rgb[..., 0].min() == 0
    grey = BandDisplay()(images[:, :1], *BandDisplay().ranges(images[:, :1]))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    tiles, _ = make_panel_tiles(images, torch.zeros(2, 2, 2), images, patch_size=4, display=display)
    assert tiles.shape == (2, 4, 8, 8, 3)
    assert build_display(3, True) is None and isinstance(build_display(3, False), BandDisplay)
    assert build_display(4, False, [3, 2, 1]).bands == [3, 2, 1]


# -------------------------------------------------------------------------------------- patch-embedding transfer


def test_rgb_weights_load_into_a_four_channel_classifier_with_the_adaptation_reported(tiny_encoder):
    from simmim_swin.transfer import load_encoder_weights

    rgb = tiny_encoder(in_chans=3)
    four = tiny_encoder(in_chans=4)
    report = load_encoder_weights(four, rgb.state_dict())
    reasons = [reason for reason, keys in report.recreated.items() if keys == ["patch_embed.proj.weight"]]
    assert reasons == ["patch embedding adapted from 3 to 4 input channels (timm adapt_input_conv)"]
    assert "adapted from 3 to 4" in report.summary()
    w_rgb, w_four = rgb.patch_embed.proj.weight, four.patch_embed.proj.weight
    # timm cycles the RGB kernels over the new channels (R, G, B, R) and scales them by 3/4
    torch.testing.assert_close(w_four, torch.cat([w_rgb, w_rgb[:, :1]], dim=1) * 3 / 4)
    assert "patch embedding" not in load_encoder_weights(tiny_encoder(in_chans=3), rgb.state_dict()).summary()


# ------------------------------------------------------------------------------------------------------ shards


def _folder(root, names):
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(root / name)
    return root


def test_make_shards_refuses_duplicate_keys_before_writing_and_keeps_the_old_set(tmp_path, capsys):
    good = _folder(tmp_path / "good", ["a.png", "b.png", "c.png"])
    out = tmp_path / "shards"
    # in this process (--workers 1): the decoding pool is test_shards' make-shards test
    tools_main(["make-shards", str(good), "--out", str(out), "--max-count", "2", "--workers", "1"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["train-000000.tar", "train-000001.tar", "train.json"]
    clash = _folder(tmp_path / "clash", ["x.png", "y.png"])
    (clash / "x.jpg").write_bytes((clash / "y.png").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        tools_main(["make-shards", str(clash), "--out", str(out), "--overwrite", "--workers", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "x.jpg" in err and "x.png" in err and "nothing was written" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte-identical, no temporary left over
    # an existing set is refused without --overwrite; --overwrite replaces every file of it, stale shards too
    with pytest.raises(SystemExit):
        tools_main(["make-shards", str(good), "--out", str(out), "--workers", "1"])
    assert "--overwrite" in capsys.readouterr().err
    one = _folder(tmp_path / "one", ["only.png"])
    tools_main(["make-shards", str(one), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train.json"]
    assert read_index(out / "train.json")["total"] == 1
    tools_main(["make-shards", str(one), "--out", str(out), "--name", "val"])  # another set in the same folder
    assert (out / "val.json").is_file() and (out / "train.json").is_file()


def test_multiband_members_round_trip_and_a_malformed_index_names_its_file(tmp_path):
    root = tmp_path / "bands"
    root.mkdir()
    bands = np.random.default_rng(0).integers(0, 65535, (13, 16, 16)).astype(np.uint16)
    np.save(root / "s2.npy", bands)
    tifffile.imwrite(root / "four.tif", bands[:4], photometric="minisblack")
    total, samples, _ = folder_samples(root)
    index = read_index(write_shards(samples, tmp_path / "out"))
    assert index["total"] == 2 and index["image_members"] == ["npy", "tif"]
    import webdataset as wds

    for sample in wds.tariterators.tarfile_samples([{"url": index["shards"][0]["url"]}]):
        image = open_image(sample)
        expected = bands if sample["__key__"] == "s2" else bands[:4]
        assert np.array_equal(image, expected)
    (tmp_path / "broken.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        read_index(tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------- check-data and stats


@pytest.mark.slow
def test_check_data_and_stats_tools(tmp_path, capsys, monkeypatch):
    root = tmp_path / "tiles"
    root.mkdir()
    rng = np.random.default_rng(0)
    tiles = [(rng.random((4, 16, 16)) * [[[100]], [[1000]], [[10000]], [[60000]]]).astype(np.uint16) for _ in range(6)]
    for i, tile in enumerate(tiles):
        tifffile.imwrite(root / f"t{i}.tif", tile, photometric="minisblack")
    (root / "t0.tif").write_bytes((root / "t0.tif").read_bytes()[:300])  # truncated
    with pytest.raises(SystemExit) as exit_info:
        tools_main(["check-data", str(root), "--in-chans", "4", "--workers", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert "5 readable images" in out and "TIFF 4 bands 16-bit int" in out and "t0.tif" in out

    tools_main(["stats", str(root), "--in-chans", "4", "--workers", "1"])  # check-data above used the pool
    out = capsys.readouterr().out
    line = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("data.mean=")][0]
    mean = json.loads(line.split()[0].split("=", 1)[1])
    std = json.loads(line.split()[1].split("=", 1)[1])
    pixels = np.stack(tiles[1:]).astype(np.float64)  # the readable ones
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="Debian's dataset-fashion-mnist")
def test_stats_of_fashion_mnist(capsys):
    from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("no dataset-fashion-mnist")
    tools_main(["stats", "--source", "fashion-mnist"])
    assert "data.mean=[72.9404] data.std=[90.0212]" in capsys.readouterr().out
