"""Data-loader throughput for SimMIM pretraining at 192 px: our shard loader against torchvision's ImageFolder.

Generates ImageNet-like JPEG photos (500x375, 500x333, 375x500 at quality 90) by random crops and resizes of the
photographs bundled with scikit-image, writes them as an image folder and as webdataset shards, then times, for
each number of workers, images per second through:

  shards          simmim-swin's ShardStream: tar shards, draft-mode JPEG decoding, crop + resize on the uint8
                  tensor (torch's antialiased bilinear), masks in the workers, uint8 batches
  folder          simmim-swin's map-style MaskedImages(ImageFiles) with the same decoding and transform (file per image)
  torchvision     torchvision.datasets.ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor +
                  Normalize with plain PIL decoding (the SimMIM reference pipeline), masks drawn the same way

It also times, in one process and thread, the decode alone and each whole per-image transform.
A second set of large photos (1600x1200, e.g. camera images) shows the effect of draft-mode decoding, which needs
a crop of at least twice the output size and so never applies to 500x375 photos at 192 px.

    python benchmarks/dataloader.py                       # prints a table, writes benchmarks/results/dataloader.json
    python benchmarks/dataloader.py --num-images 500 --workers 1 --repeats 1    # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import skimage.data
import torch
import torchvision
import webdataset
from flops import cpu_model  # benchmarks/ is on sys.path when the script runs
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from simmim_swin.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    MaskedImages,
    PretrainCrop,
    PretrainSample,
    ShardStream,
    build_pretrain_loader,
    build_shard_loader,
    folder_samples,
    read_index,
    write_shards,
)
from simmim_swin.masking import MaskGenerator

IMG_SIZE = 192
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500))  # the commonest ImageNet shapes
LARGE_SIZES = ((1600, 1200),)


def bundled_photos() -> list[np.ndarray]:
    """The colour photographs shipped with scikit-image, as RGB arrays."""
    left, right, _ = skimage.data.stereo_motorcycle()
    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    return [getattr(skimage.data, name)() for name in names] + [left, right]


def generate_photos(root: Path, num_images: int, sizes: tuple[tuple[int, int], ...], seed: int) -> None:
    """num_images JPEGs (quality 90) under root/<photo name>/: random crops (30-100% of the area) resized to a size."""
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    for i in range(num_images):
        k = i % len(photos)
        photo = photos[k]
        height, width = photo.shape[:2]
        out_w, out_h = sizes[rng.integers(len(sizes))]
        area = rng.uniform(0.3, 1.0) * height * width
        crop_h = int(min(height, np.sqrt(area * out_h / out_w)))
        crop_w = int(min(width, crop_h * out_w / out_h))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((out_w, out_h), Image.BICUBIC)
        path = root / f"photo{k}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


class WithMask:
    """torchvision transform + SimMIM mask: the sample the reference pipeline makes, (image, mask)."""

    def __init__(self, transform, mask_generator: MaskGenerator) -> None:
        self.transform, self.mask_generator = transform, mask_generator

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.mask_generator()


def make_loader(kind: str, folder: Path, urls: list[str], workers: int, batch_size: int) -> DataLoader:
    """One of the three pipelines, with `workers` worker processes."""
    mask_generator = MaskGenerator(IMG_SIZE, 32, 4, 0.6)
    if kind == "shards":
        sample_fn = PretrainSample(PretrainCrop(IMG_SIZE), mask_generator)
        stream = ShardStream(urls, sample_fn, batch_size=batch_size, batches_per_epoch=10**6, shuffle_buffer=500)
        return build_shard_loader(stream, num_workers=workers)
    if kind == "folder":
        dataset = MaskedImages(ImageFiles(folder), PretrainCrop(IMG_SIZE), mask_generator)
        return build_pretrain_loader(dataset, batch_size=batch_size, num_workers=workers, seed=0)
    transform = T.Compose([
        T.RandomResizedCrop(IMG_SIZE, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    dataset = datasets.ImageFolder(str(folder), transform=WithMask(transform, mask_generator))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True)


def images_per_second(loader: DataLoader, num_images: int, warmup_batches: int) -> float:
    """Images per second over `num_images` images, after `warmup_batches` (worker start-up, first reads)."""

    def endless():  # a small folder runs out of batches: start another epoch
        while True:
            yield from loader

    batches = endless()
    for _ in range(warmup_batches):
        next(batches)
    count, start = 0, time.perf_counter()
    while count < num_images:
        count += _num_images(next(batches))
    return count / (time.perf_counter() - start)


def per_image_ms(folder: Path, num_images: int = 200) -> dict[str, float]:
    """Milliseconds per image in this process, one thread, best of 3: decoding alone and each whole transform."""
    datas = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:num_images]]
    tv_transform = T.Compose([
        T.RandomResizedCrop(IMG_SIZE, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    ours = PretrainCrop(IMG_SIZE)
    steps = {
        "decode": lambda d: Image.open(io.BytesIO(d)).convert("RGB"),
        "torchvision": lambda d: tv_transform(Image.open(io.BytesIO(d)).convert("RGB")),
        "ours": lambda d: ours(Image.open(io.BytesIO(d))),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker
    result = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for data in datas:
                step(data)
            best = min(best, (time.perf_counter() - start) / len(datas) * 1e3)
        result[name] = round(best, 3)
    torch.set_num_threads(threads)
    return result


def _num_images(batch) -> int:
    if hasattr(batch, "data"):  # shards: Batch(data=(images, masks), ...)
        return batch.data[0].shape[0]
    first = batch[0]  # folder: [images, masks]; torchvision: [[images, masks], labels]
    return (first[0] if isinstance(first, (list, tuple)) else first).shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=3000, help="ImageNet-like photos to generate")
    parser.add_argument("--num-large", type=int, default=600, help="large (1600x1200) photos; 0 skips the set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--measure-images", type=int, default=1024, help="images timed per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per setting; the best is kept")
    parser.add_argument("--workdir", default=None, help="where to write the photos and shards (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataloader.json"))
    args = parser.parse_args()
    if args.batch_size < 1 or min(args.workers) < 0:  # the loaders take the values as checked
        parser.error(f"--batch-size {args.batch_size} must be >= 1 and --workers {args.workers} >= 0, e.g. 32 and 2")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="simmim_loader_bench_"))
    sets = [("imagenet-like", args.num_images, IMAGENET_SIZES)]
    if args.num_large:
        sets.append(("large-1600x1200", args.num_large, LARGE_SIZES))
    load_before = os.getloadavg()
    results = []
    breakdowns: dict[str, dict[str, float]] = {}
    try:
        for name, count, sizes in sets:
            folder = workdir / name / "folder"
            if not folder.is_dir():
                print(f"generating {count} {name} JPEGs in {folder} ...", flush=True)
                generate_photos(folder, count, sizes, seed=0)
            index_path = workdir / name / "shards" / "train.json"
            if not index_path.is_file():
                write_shards(folder_samples(folder)[1], index_path.parent, name="train", max_count=100)
            urls = [s["url"] for s in read_index(index_path)["shards"]]
            mean_kb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / count / 1024
            measure = min(args.measure_images, count // 2)
            breakdown = per_image_ms(folder)
            breakdowns[name] = breakdown
            print(f"{name}: ms per image in one process: " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()))
            for workers in args.workers:
                best: dict[str, float] = {}
                loads: dict[str, list[float]] = {}
                for _ in range(args.repeats):
                    # alternate the pipelines so that a change of machine load hits all of them alike
                    for kind in ("torchvision", "shards", "folder"):
                        loader = make_loader(kind, folder, urls, workers, args.batch_size)
                        rate = images_per_second(loader, measure, warmup_batches=2 * workers)
                        best[kind] = max(best.get(kind, 0.0), rate)
                        loads.setdefault(kind, []).append(round(os.getloadavg()[0], 2))
                        del loader
                for kind, rate in best.items():
                    ratio = rate / best["torchvision"]
                    results.append({
                        "set": name, "mean_jpeg_kb": round(mean_kb, 1), "loader": kind, "workers": workers,
                        "images_per_sec": round(rate, 1), "per_worker": round(rate / workers, 1),
                        "vs_torchvision": round(ratio, 2), "load_1min": loads[kind],
                    })  # fmt: skip
                    line = (
                        f"{name:16s} {kind:12s} workers {workers}: {rate:7.1f} img/s ({rate / workers:6.1f} per worker"
                    )
                    print(f"{line}, {ratio:.2f}x torchvision)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "webdataset": webdataset.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "settings": {
            "img_size": IMG_SIZE,
            "batch_size": args.batch_size,
            "measure_images": args.measure_images,
            "repeats": args.repeats,
            "num_images": args.num_images,
            "num_large": args.num_large,
        },  # fmt: skip
        "ms_per_image_in_process": breakdowns,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'set':16s} {'loader':12s} {'workers':>7s} {'img/s':>8s} {'per worker':>10s} {'vs tv':>6s}")
    for r in results:
        print(f"{r['set']:16s} {r['loader']:12s} {r['workers']:7d} {r['images_per_sec']:8.1f} "
              f"{r['per_worker']:10.1f} {r['vs_torchvision']:6.2f}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
