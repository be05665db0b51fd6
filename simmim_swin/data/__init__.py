"""Data pipeline for SimMIM pretraining: transforms, datasets, deterministic loaders."""

from simmim_swin.data.datasets import (
    DATA_SOURCES,
    IMAGE_EXTENSIONS,
    PHOTO_FILES,
    ImageFolderMIM,
    PhotoCrops,
    build_pretrain_dataset,
    find_images,
)
from simmim_swin.data.loader import (
    SeededSampler,
    SeededSamples,
    build_pretrain_loader,
    make_epoch_generator,
    make_fixed_batch,
)
from simmim_swin.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_pretrain_transform,
    denormalize,
)

__all__ = [
    "DATA_SOURCES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PHOTO_FILES",
    "ImageFolderMIM",
    "PhotoCrops",
    "SeededSampler",
    "SeededSamples",
    "build_eval_transform",
    "build_pretrain_dataset",
    "build_pretrain_loader",
    "build_pretrain_transform",
    "denormalize",
    "find_images",
    "make_epoch_generator",
    "make_fixed_batch",
]
