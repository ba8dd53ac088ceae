"""Real MNIST / Fashion-MNIST loading from the IDX .gz files, checksums, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from capsnet_core.data import ChecksumError, DatasetMissingError, load_dataset


def test_mnist_splits_match_the_published_files(data_dir: Path) -> None:
    train = load_dataset("mnist", "train", root=data_dir)
    test = load_dataset("mnist", "test", root=data_dir)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.images.float().mean().item() == pytest.approx(33.318, abs=0.01)


def test_fashion_mnist_loads(data_dir: Path) -> None:
    test = load_dataset("fashion-mnist", "test", root=data_dir)
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert test.classes[9] == "Ankle boot"


def test_subset_takes_the_first_examples(data_dir: Path) -> None:
    test = load_dataset("mnist", "test", root=data_dir)
    small = test.subset(100)
    assert len(small) == 100 and torch.equal(small.labels, test.labels[:100])


def test_missing_files_offline_name_the_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match=r"train-images-idx3-ubyte.gz.*" + str(tmp_path / "MNIST" / "raw")):
        load_dataset("mnist", "train", root=tmp_path, download=False)


def test_corrupted_file_fails_its_checksum(tmp_path: Path, data_dir: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_dir / "MNIST" / "raw").iterdir():
        shutil.copy(f, raw / f.name)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the published file")
    with pytest.raises(ChecksumError, match="MD5"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


def test_unknown_dataset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
