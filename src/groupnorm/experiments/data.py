"""Fashion-MNIST from the standard idx files, loaded into memory as tensors.

The idx format (LeCun et al.) is a big-endian header followed by raw bytes: a magic number
``0x0000TTDD`` (``TT`` the element type, ``0x08`` for unsigned bytes here; ``DD`` the number of
dimensions), then one uint32 per dimension, then the data. Files may be gzipped (``*.gz``, as
Debian's ``dataset-fashion-mnist`` installs them) or plain. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_DATA_DIR",
    "FILES",
    "Dataset",
    "find_idx_file",
    "read_idx",
    "load_fashion_mnist",
    "write_idx",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

#: split -> (images file stem, labels file stem, number of examples)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

_UBYTE = 0x08

HOW_TO_GET = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist, which puts the files "
    f"in {DEFAULT_DATA_DIR}; or run `make data`), or copy the four idx files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]) from the Fashion-MNIST release into a folder and pass "
    "--data FOLDER."
)


def find_idx_file(data_dir: str | os.PathLike, stem: str) -> Path:
    """Return ``data_dir/stem.gz`` or ``data_dir/stem``, whichever exists (gzipped first).

    Raises:
        FileNotFoundError: neither exists; the message says how to get the files.
    """
    folder = Path(data_dir)
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}. {HOW_TO_GET}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file of unsigned bytes (gzipped if the name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        A uint8 array with the shape stored in the header.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid idx file of unsigned bytes (bad magic number,
            truncated data, trailing bytes, or a broken gzip stream).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} does not exist. {HOW_TO_GET}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError)
        raise ValueError(
            f"{path} is not a readable gzip file ({exc}); the download may be corrupt. {HOW_TO_GET}"
        ) from exc
    if len(raw) < 4:
        raise ValueError(f"{path} is too short ({len(raw)} bytes) to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _UBYTE or not 1 <= ndim <= 4:
        raise ValueError(
            f"{path} does not start with an idx magic number for unsigned bytes "
            f"(got 0x{raw[:4].hex()}, expected 0x000008NN with NN the number of dimensions); "
            f"is it the right file?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} ends inside its header ({len(raw)} bytes)")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        raise ValueError(
            f"{path} holds {actual} data bytes but its header declares shape {shape} "
            f"({expected} bytes); the file is truncated or corrupt. {HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzipped if the name ends in ``.gz``); for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, _UBYTE, array.ndim)
    data += struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@dataclass
class Dataset:
    """Images and labels in memory, normalised with the training set's mean and std.

    Attributes:
        train_x: float32 (N, 1, 28, 28). ``train_y``: int64 (N,).
        test_x, test_y: the same for the test split.
        mean, std: the scalars used to normalise (from the training images).
        source: folder the files came from.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: float
    std: float
    source: str


def _load_split(folder: Path, split: str, check_count: bool) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem, count = FILES[split]
    images = read_idx(find_idx_file(folder, images_stem))
    labels = read_idx(find_idx_file(folder, labels_stem))
    if images.ndim != 3:
        raise ValueError(f"{split} images must be 3-d (N, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{split} labels must be 1-d (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split} split has {images.shape[0]} images but {labels.shape[0]} labels")
    if check_count and images.shape[0] != count:
        raise ValueError(f"{split} split has {images.shape[0]} examples; Fashion-MNIST has {count}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{split} labels must be 0..9, found {int(labels.max())}")
    return images, labels


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, *, check_counts: bool = True
) -> Dataset:
    """Load both splits of Fashion-MNIST into memory and normalise them.

    Pixels are scaled to [0, 1], then standardised with the mean and standard deviation of the
    training images (one scalar each), so train and test see the same transform.

    Args:
        data_dir: folder with the four idx files (gzipped or not); default
            ``/usr/share/datasets/fashion-mnist``.
        check_counts: require the official sizes (60,000 and 10,000); tests turn it off.

    Raises:
        FileNotFoundError: a file is missing (the message says how to get it).
        ValueError: a file is corrupt or the splits do not fit together.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} does not exist. {HOW_TO_GET}")
    train_img, train_lab = _load_split(folder, "train", check_counts)
    test_img, test_lab = _load_split(folder, "test", check_counts)
    if train_img.shape[1:] != test_img.shape[1:]:
        raise ValueError(
            f"train images are {train_img.shape[1:]} but test images {test_img.shape[1:]}"
        )
    train_x = torch.from_numpy(train_img.astype(np.float32) / 255.0).unsqueeze(1)
    test_x = torch.from_numpy(test_img.astype(np.float32) / 255.0).unsqueeze(1)
    mean = float(train_x.mean())
    std = float(train_x.std()) or 1.0
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std
    return Dataset(
        train_x=train_x.contiguous(),
        train_y=torch.from_numpy(train_lab.astype(np.int64)),
        test_x=test_x.contiguous(),
        test_y=torch.from_numpy(test_lab.astype(np.int64)),
        mean=mean,
        std=std,
        source=str(folder),
    )
