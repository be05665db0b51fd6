"""Writing webdataset shards (folder, Fashion-MNIST), the index file, URL resolution and the make-shards tool."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from simmim_swin.cli.tools import main as tools_main
from simmim_swin.data import (
    BadSampleLog,
    ShardSample,
    folder_samples,
    iter_shard_samples,
    open_image,
    read_index,
    resolve_urls,
    write_shards,
)
from simmim_swin.data.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist


def _image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture()
def class_folder(tmp_path):
    """Two class folders with PNG and JPEG files (one name with extra dots), plus a file that is not an image."""
    root = tmp_path / "images"
    files = {"cat/a.png": 0, "cat/b.jpg": 1, "dog/c.JPEG": 2, "dog/deep/d.v2.png": 3, "dog/e.png": 4}
    for name, seed in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image_bytes(seed, "JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG"))
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    return root, files


def _read_all(urls):
    log = BadSampleLog()
    return [s for s in iter_shard_samples(urls, log) if s is not None], log


def test_folder_shards_read_back_the_same_bytes_and_labels(class_folder, tmp_path):
    root, files = class_folder
    skipped: list[str] = []
    total, samples, classes = folder_samples(root, labels=True, skipped=skipped)
    assert total == 6 and classes == ["cat", "dog"]
    index_path = write_shards(samples, tmp_path / "out", name="train", max_count=2, classes=classes, source="test")
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    # the file, not a BytesIO
    assert skipped[0] == f"{root / 'dog' / 'broken.png'}: UnidentifiedImageError: cannot identify image file"

    index = read_index(index_path)
    assert index["total"] == 5 and index["classes"] == ["cat", "dog"]
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]
    urls, total = resolve_urls(str(index_path))
    assert total == 5 and urls == [str(tmp_path / "out" / s["name"]) for s in index["shards"]]

    samples, log = _read_all(urls)
    assert log.total == 0
    by_key = {s["__key__"]: s for s in samples}
    # keys are relative paths without extension; dots in names become underscores (webdataset splits at a dot)
    assert sorted(by_key) == ["cat/a", "cat/b", "dog/c", "dog/deep/d_v2", "dog/e"]
    for name in files:
        key = name.rsplit(".", 1)[0].replace(".", "_")
        sample = by_key[key]
        ext = "jpg" if name.lower().endswith(("jpg", "jpeg")) else "png"
        assert sample[ext] == (root / name).read_bytes()  # the file's own bytes, not re-encoded
        assert int(sample["cls"]) == (0 if name.startswith("cat") else 1)  # the class as ASCII
        with open_image(sample) as img:
            assert img.size == (20, 16)


def test_folder_shards_without_labels_and_errors(class_folder, tmp_path):
    root, _ = class_folder
    total, samples, classes = folder_samples(root)
    assert classes is None
    index_path = write_shards(samples, tmp_path / "out", name="nolabels")
    samples, _ = _read_all(resolve_urls(str(index_path))[0])
    assert len(samples) == 5 and all("cls" not in s for s in samples)

    (root / "loose.png").write_bytes(_image_bytes(9))
    with pytest.raises(ValueError, match="directly in"):
        folder_samples(root, labels=True)
    with pytest.raises(ValueError, match="no samples"):
        write_shards(iter([]), tmp_path / "empty")
    assert not list((tmp_path / "empty").glob("*.tar"))  # no empty shard left behind
    duplicate = [ShardSample("k", b"x", "png"), ShardSample("k", b"y", "png")]
    with pytest.raises(ValueError, match="'k'"):
        write_shards(iter(duplicate), tmp_path / "dup")


def test_max_size_closes_shards(tmp_path):
    samples = (ShardSample(f"s{i}", bytes(3000), "png") for i in range(6))
    index = read_index(write_shards(samples, tmp_path, max_count=100, max_size=5000))
    # 3000 payload bytes per sample: a shard is closed once it holds >= 5000 bytes, i.e. after 2 samples
    assert [s["count"] for s in index["shards"]] == [2, 2, 2]


def test_resolve_urls_forms_and_errors(tmp_path):
    for i in range(3):
        with tarfile.open(tmp_path / f"s-{i:02d}.tar", "w"):
            pass
    pattern = str(tmp_path / "s-{00..02}.tar")
    urls, total = resolve_urls(pattern)
    assert total is None and urls == [str(tmp_path / f"s-{i:02d}.tar") for i in range(3)]
    assert resolve_urls(f"{tmp_path}/s-00.tar::{tmp_path}/s-02.tar")[0] == [urls[0], urls[2]]
    assert resolve_urls([urls[1], urls[2]])[0] == urls[1:]
    assert resolve_urls("pipe:cat /somewhere/x.tar")[0] == ["pipe:cat /somewhere/x.tar"]  # not checked locally
    with pytest.raises(ValueError, match="do not exist"):
        resolve_urls(str(tmp_path / "s-{00..05}.tar"))
    with pytest.raises(ValueError, match="empty"):
        resolve_urls(None)
    with pytest.raises(ValueError, match="make-shards"):
        resolve_urls(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="not a shard index"):
        resolve_urls(str(tmp_path / "other.json"))


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="no dataset-fashion-mnist")
def test_fashion_mnist_shards_read_back_the_same_images_and_labels(tmp_path, capsys):
    tools_main(["make-shards", "--source", "fashion-mnist", "--split", "test", "--out", str(tmp_path),
                "--name", "test", "--max-count", "4000", "--log-every", "5000"])  # fmt: skip
    out = capsys.readouterr()
    assert "wrote 10000 samples, 10 classes in 3 shards" in out.out
    assert "make-shards test: 5000/10000" in out.err  # progress lines when not on a terminal
    images, labels = load_fashion_mnist("test")
    urls, total = resolve_urls(str(tmp_path / "test.json"))
    assert total == 10000 and len(urls) == 3
    samples, log = _read_all(urls)
    assert log.total == 0 and len(samples) == 10000
    for sample in samples[::997]:
        i = int(sample["__key__"].split("_")[1])
        with open_image(sample) as img:
            np.testing.assert_array_equal(np.asarray(img), images[i])  # PNG is lossless
        assert int(sample["cls"]) == labels[i]


@pytest.mark.slow
def test_make_shards_tool_from_a_folder_and_user_errors(class_folder, tmp_path, capsys):
    root, _ = class_folder
    argv = ["make-shards", str(root), "--out", str(tmp_path / "s"), "--labels", "--max-count", "3"]
    tools_main([*argv, "--workers", "2"])  # a pool decodes the files; the shards keep the files' order
    out = capsys.readouterr()
    assert "wrote 5 samples, 2 classes in 2 shards" in out.out and "1 unreadable files skipped" in out.out
    broken = root / "dog" / "broken.png"
    assert f"skipped (a run would skip it): {broken}: UnidentifiedImageError: cannot identify image file\n" in out.err
    assert "BytesIO" not in out.err
    assert (tmp_path / "s" / "train.json").is_file()
    for argv, message in [
        (["make-shards", "--out", str(tmp_path / "x")], "image folder"),
        (["make-shards", str(root), "--source", "fashion-mnist", "--out", str(tmp_path / "x")], "reads no folder"),
        (["make-shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tools_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
