"""Data pipeline for SimMIM pretraining: transforms, datasets, deterministic loaders, webdataset shards."""

from simmim_swin.data.datasets import (
    PHOTO_FILES,
    ImageFiles,
    MaskedImages,
    build_pretrain_dataset,
    find_images,
    load_photos,
)
from simmim_swin.data.fashion_mnist import FashionMNIST
from simmim_swin.data.images import BadSample, ImageTooLargeError, open_source, to_tensor
from simmim_swin.data.loader import SeededSampler, build_pretrain_loader, make_fixed_batch
from simmim_swin.data.pipeline import PretrainData, build_pretrain_data
from simmim_swin.data.shards import ShardSample, folder_samples, read_index, resolve_urls, write_shards
from simmim_swin.data.stream import (
    BadDataError,
    BadDataMonitor,
    BadSampleLog,
    Batch,
    PretrainSample,
    ShardStream,
    build_shard_loader,
    collate_good,
    iter_shard_samples,
    open_image,
)
from simmim_swin.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalView,
    Normalizer,
    PretrainCrop,
    build_eval_transform,
    denormalize,
    normalize_images,
    sample_crop_box,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTO_FILES",
    "BadDataError",
    "BadDataMonitor",
    "BadSample",
    "BadSampleLog",
    "Batch",
    "EvalView",
    "FashionMNIST",
    "ImageFiles",
    "ImageTooLargeError",
    "MaskedImages",
    "Normalizer",
    "PretrainCrop",
    "PretrainData",
    "PretrainSample",
    "SeededSampler",
    "ShardSample",
    "ShardStream",
    "build_eval_transform",
    "build_pretrain_data",
    "build_pretrain_dataset",
    "build_pretrain_loader",
    "build_shard_loader",
    "collate_good",
    "denormalize",
    "find_images",
    "folder_samples",
    "iter_shard_samples",
    "load_photos",
    "make_fixed_batch",
    "normalize_images",
    "open_image",
    "open_source",
    "read_index",
    "resolve_urls",
    "sample_crop_box",
    "to_tensor",
    "write_shards",
]
