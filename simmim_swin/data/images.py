"""Image files as they are (8-bit images stay uint8, others become float32 in the file's units): any depth and bands."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageMode

from simmim_swin.config import DEFAULT_MAX_IMAGE_PIXELS

EIGHT_BIT_MODES: frozenset[str] = frozenset({"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "RGBX"})

ImageSource = Image.Image | np.ndarray

# set once, not per TIFF read: setLevel clears the cache of every logger in the process
logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # a broken file is reported once, by the caller

# PIL opens 16-bit-per-channel colour PNGs (48-bit RGB, 64-bit RGBA) and 16-bit grey + alpha in 8-bit modes, keeping
# only the high byte of each sample. Its own decoder reads every bit when asked for another raw mode of the same
# bits per pixel (so that the PNG filters still see the right pixel stride): ";16L" unpacks the low bytes of the
# big-endian samples, and plain "RGBA" passes the 4 bytes of a 16-bit grey + alpha pixel through unchanged.
# rawmode of the file -> (decodes that together give every byte, samples per pixel)
_PNG16_DECODES: dict[str, tuple[tuple[str, ...], int]] = {
    "RGB;16B": (("RGB;16B", "RGB;16L"), 3),
    "RGBA;16B": (("RGBA;16B", "RGBA;16L"), 4),
    "LA;16B": (("RGBA",), 2),
}


class ImageTooLargeError(ValueError):
    """An image over data.max_image_pixels (PIL's decompression-bomb limit)."""


class BadSample(NamedTuple):
    """What a map-style dataset returns for a file it cannot read: the file and why."""

    path: str
    reason: str


def describe_error(error: BaseException) -> str:
    """'TypeName: first line of the message', with PIL's in-memory buffer names left out."""
    message = str(error.args[0]) if error.args else repr(error)  # webdataset appends the stream and url to args
    message = message.splitlines()[0] if message else ""
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message)  # PIL names its buffer, not the file
    return f"{type(error).__name__}: {message}"


def _check_pixels(num_pixels: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and num_pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name} has {num_pixels} pixels, more than data.max_image_pixels={max_pixels} (a guard against "
            "decompression bombs); raise data.max_image_pixels if the image is genuine"
        )


def open_source(
    data: bytes | str | os.PathLike, ext: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> ImageSource:
    """A file's image: a lazily opened PIL image, or a (C, H, W) array (.npy, TIFF, 16-bit colour PNG).

    Args:
        data: a path, or the file's bytes (a shard member) with its extension `ext` ("png", ".npy", ...).
    """
    name = str(data) if not isinstance(data, bytes) else f"a .{str(ext).lstrip('.')} member"
    suffix = "." + (ext.lstrip(".") if ext else Path(str(data)).suffix.lstrip(".")).lower()
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    if suffix == ".npy":
        array = np.load(stream, allow_pickle=False, mmap_mode=None if isinstance(data, bytes) else "r")
        if array.ndim not in (2, 3):
            raise ValueError(f"{name}: a .npy image must be (H, W) or (C, H, W), got shape {array.shape}")
        if array.ndim == 3 and array.shape[2] <= 4 < array.shape[0]:
            raise ValueError(
                f"{name}: shape {array.shape} looks channels-last (H, W, C) with {array.shape[2]} channels, but "
                ".npy images are read as (C, H, W): save it as np.moveaxis(a, -1, 0)"
            )
        _check_pixels(array.shape[-1] * array.shape[-2], max_pixels, name)
        return np.array(array if array.ndim == 3 else array[None])  # read now (a writable copy of the map)
    if suffix in (".tif", ".tiff"):
        array = _read_tiff(stream, max_pixels, name)
        if array is not None:
            return array
        if isinstance(stream, io.BytesIO):
            stream.seek(0)
    Image.MAX_IMAGE_PIXELS = None  # PIL's own check only warns below twice its limit, and names no file
    try:
        img = Image.open(stream)
    finally:
        # per process (spawned DataLoader workers read it here too): PIL checks it again when a transform crops the
        # image, so it stays set, also after a file PIL cannot open; a tool restores it when it returns (cli/tools.py)
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        _check_pixels(img.width * img.height, max_pixels, name)
    except ImageTooLargeError:
        img.close()
        raise
    rawmode = img.tile[0][3] if img.format == "PNG" and img.tile else None
    if rawmode in _PNG16_DECODES:
        img.close()
        return _read_png16(data, rawmode)
    return img


def _read_png16(data: bytes | str | os.PathLike, rawmode: str) -> np.ndarray:
    decodes, samples = _PNG16_DECODES[rawmode]
    planes = []
    for raw in decodes:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.tile = [(*tile[:3], raw) for tile in img.tile]
            img.load()
            planes.append(np.asarray(img, dtype=np.uint16))  # H, W, bands: one byte of each sample
    high, low = (planes[0], planes[1]) if len(planes) == 2 else (planes[0][..., 0::2], planes[0][..., 1::2])
    pixels = high << 8 | low
    return np.ascontiguousarray(pixels[..., :samples].transpose(2, 0, 1))  # C, H, W


def _read_tiff(stream: io.BytesIO | str | os.PathLike, max_pixels: int | None, name: str) -> np.ndarray | None:
    """A TIFF's first series as (C, H, W), every axis but Y, X as channels; None for an 8-bit photo, which PIL reads."""
    import tifffile  # a scikit-image dependency; imported here so that 8-bit photo pipelines never load it

    with tifffile.TiffFile(stream) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"{name}: TIFF series with axes {axes!r} has no Y and X axes")
        _check_pixels(shape[axes.index("Y")] * shape[axes.index("X")], max_pixels, name)
        samples = shape[axes.index("S")] if "S" in axes else 1
        if series.dtype == np.uint8 and set(axes) <= {"Y", "X", "S"} and samples <= 4:
            return None
        array = series.asarray()
    y, x = axes.index("Y"), axes.index("X")
    others = [i for i in range(array.ndim) if i not in (y, x)]
    array = array.transpose(*others, y, x)  # ..., H, W
    return array.reshape(-1, *array.shape[-2:])  # C, H, W


def source_channels(source: ImageSource) -> int:
    """The channels an image gives when read as it is (a palette image as RGB)."""
    if isinstance(source, Image.Image):
        return 3 if source.mode == "P" else len(source.getbands())
    return int(source.shape[0])


def verify_image(
    data: bytes | str | os.PathLike, ext: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> None:
    """Decode an image completely, as a run does: raises what a run would skip it for."""
    source = open_source(data, ext, max_pixels=max_pixels)
    try:
        to_tensor(source, source_channels(source))
    finally:
        close_source(source)


def describe_source(source: ImageSource, ext: str | None = None) -> str:
    """A short description for check-data, 'PNG I;16 1 band 16-bit int'; `ext` names the format of an array."""
    if isinstance(source, Image.Image):
        kind, mode, bands = source.format or "image", source.mode, len(source.getbands())
    else:
        fmt = (ext or "").lower().lstrip(".")
        kind, mode, bands = {"tif": "TIFF", "tiff": "TIFF"}.get(fmt, fmt.upper() or "array"), "", source.shape[0]
    return " ".join(p for p in (kind, mode, f"{bands} band{'s' if bands != 1 else ''}", source_depth(source)) if p)


def source_depth(source: ImageSource) -> str:
    """The bits per sample as check-data names them: '8-bit int', '16-bit int', '32-bit float'."""
    # a PIL image's numpy dtype from its mode, as PIL's own array interface takes it: no decode
    dtype = np.dtype(ImageMode.getmode(source.mode).typestr) if isinstance(source, Image.Image) else source.dtype
    return f"{dtype.itemsize * 8}-bit {'float' if dtype.kind == 'f' else 'int'}"


def to_tensor(source: ImageSource, in_chans: int) -> torch.Tensor:
    """(in_chans, H, W): uint8 for 8-bit images, float32 in the file's units for every other depth."""
    # 8-bit images take PIL's convert to RGB / L (grey to three channels, colour to luma, alpha dropped), exactly as an
    # RGB pipeline does; grey arrays fill three channels; any other band count must equal in_chans
    if isinstance(source, Image.Image):
        if source.mode in EIGHT_BIT_MODES and in_chans in (1, 3):
            target = "RGB" if in_chans == 3 else "L"
            img = source if source.mode == target else source.convert(target)
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
            return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)  # H, W, C -> C, H, W (a view)
        if source.mode == "P":
            source = source.convert("RGBA" if "transparency" in source.info else "RGB")
        array = np.asarray(source)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # C, H, W
    else:
        array = source
    bands = array.shape[0]
    if bands == 1 and in_chans == 3:
        array = np.repeat(array, 3, axis=0)
    elif bands != in_chans and not isinstance(source, Image.Image) and array.shape[-1] == in_chans:
        raise ValueError(
            f"the array has shape {tuple(array.shape)}, read as (C, H, W) = {bands} bands, but model.in_chans="
            f"{in_chans} matches its last axis: it looks channels-last (H, W, C); store (C, H, W) arrays "
            "(np.moveaxis(a, -1, 0))"
        )
    elif bands != in_chans:
        raise ValueError(
            f"the image has {bands} band{'s' if bands != 1 else ''} but model.in_chans={in_chans}; set "
            f"model.in_chans={bands} or convert the files"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    _check_finite(array)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _check_finite(array: np.ndarray) -> None:
    # one NaN pixel makes the loss of every batch holding the image non-finite: skip the file, not the whole step
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    bands = sorted({int(c) for c in np.nonzero(~finite.reshape(len(array), -1).all(axis=1))[0]})
    shown = ("bands " if len(bands) > 1 else "band ") + ", ".join(map(str, bands[:8])) + (", ..." * (len(bands) > 8))
    raise ValueError(
        f"the image holds {nan} NaN and {int((~finite).sum()) - nan} infinite pixel values ({shown}); replace them "
        "(e.g. np.nan_to_num) or remove the file"
    )


def close_source(source: ImageSource) -> None:
    """Close the file a PIL image still holds; an in-memory one stays usable (ImageList lends its images)."""
    if isinstance(source, Image.Image) and getattr(source, "fp", None) is not None:
        source.close()
