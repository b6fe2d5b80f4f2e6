"""The Fashion-MNIST idx reader: gzipped and plain files, and its errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from groupnorm.experiments.data import (
    FILES,
    find_idx_file,
    load_fashion_mnist,
    read_idx,
    write_idx,
)


def write_fake_dataset(folder, n_train=64, n_test=32, gz=True, seed=0):
    """Tiny Fashion-MNIST look-alike: random images whose mean brightness encodes the label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 100, size=(n, 28, 28)).astype(np.uint8)
        images[:, 10:18, 10:18] += (labels * 15)[:, None, None].astype(np.uint8)
        stem_images, stem_labels, _ = FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(folder / (stem_images + suffix), images)
        write_idx(folder / (stem_labels + suffix), labels)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    if gz:  # really gzipped, with the standard header
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert gzip.decompress(path.read_bytes())[:4] == b"\x00\x00\x08\x03"
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_dataset(tmp_path, gz):
    raw = write_fake_dataset(tmp_path, gz=gz)
    data = load_fashion_mnist(tmp_path, check_counts=False)
    assert data.train_x.shape == (64, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (32, 1, 28, 28)
    torch.testing.assert_close(data.train_y, torch.from_numpy(raw["train"][1].astype(np.int64)))
    # normalised with the training images' statistics
    assert abs(float(data.train_x.mean())) < 1e-4
    assert abs(float(data.train_x.std()) - 1) < 1e-3
    expected = (raw["test"][0][3] / 255.0 - data.mean) / data.std
    np.testing.assert_allclose(data.test_x[3, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gzipped_file_preferred_and_plain_found(tmp_path):
    write_idx(tmp_path / "x.idx", np.zeros((2, 2), np.uint8))
    assert find_idx_file(tmp_path, "x.idx").name == "x.idx"
    write_idx(tmp_path / "x.idx.gz", np.ones((2, 2), np.uint8))
    assert find_idx_file(tmp_path, "x.idx").name == "x.idx.gz"


def test_missing_folder_and_file_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nope")
    write_fake_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\].*--data"):
        load_fashion_mnist(tmp_path, check_counts=False)


def test_official_counts_checked(tmp_path):
    write_fake_dataset(tmp_path)
    with pytest.raises(ValueError, match="Fashion-MNIST has 60000"):
        load_fashion_mnist(tmp_path)


def test_corrupt_files(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    write_idx(path, good)
    raw = path.read_bytes()

    path.write_bytes(raw[:-5])  # truncated data
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)
    path.write_bytes(raw + b"xx")  # trailing bytes
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # float magic, not ubyte
    with pytest.raises(ValueError, match="magic number"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(path)

    gz = tmp_path / "b.idx.gz"
    write_idx(gz, good)
    gz.write_bytes(gz.read_bytes()[:-12])  # cut gzip stream
    with pytest.raises(ValueError, match="gzip"):
        read_idx(gz)
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        read_idx(gz)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing.idx")


def test_mismatched_splits(tmp_path):
    write_fake_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(63, np.uint8))
    with pytest.raises(ValueError, match="64 images but 63 labels"):
        load_fashion_mnist(tmp_path, check_counts=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(64, 12, np.uint8))
    with pytest.raises(ValueError, match="labels must be 0..9"):
        load_fashion_mnist(tmp_path, check_counts=False)
