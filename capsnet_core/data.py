"""MNIST and Fashion-MNIST from IDX ``.gz`` files in torchvision's layout, as uint8 tensors.

The data root (``CAPSNET_DATA_DIR``, default ``~/.cache/capsnet/data``) holds
``<root>/MNIST/raw/*-ubyte.gz`` and ``<root>/FashionMNIST/raw/*-ubyte.gz``.  The files are read
directly (the root may be read-only) and their MD5 checked.  A missing file is downloaded
from torchvision's mirrors when online, into the root if writable, else into the user cache.

A derived data root (a copy with, say, relabelled test files for an experiment or a test) may
carry its own checksums: ``<root>/<folder>/raw/MD5SUMS``, in ``md5sum``'s format
(``<md5>  <file name>`` per line). Its entries replace the published MD5s for the files in that
folder only; the user cache and downloads are always checked against the published ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class DatasetInfo:
    folder: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        folder="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": DatasetInfo(
        folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"),
    ),
}
DATASET_NAMES = tuple(DATASETS)


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not under the data root and could not be downloaded."""


class ChecksumError(ValueError):
    """A dataset file exists but is not the published file."""


@dataclass(frozen=True)
class Dataset:
    """One split held as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def classes(self) -> tuple[str, ...]:
        return DATASETS[self.name].classes

    def subset(self, n: int | None) -> Dataset:
        """The first n examples (all when n is None or larger than the split)."""
        if n is None or n >= len(self):
            return self
        return Dataset(self.name, self.split, self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.split, self.images.to(device), self.labels.to(device))


def default_data_root() -> Path:
    root = os.environ.get("CAPSNET_DATA_DIR")
    if root:
        return Path(root).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "capsnet" / "data"


def _user_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "capsnet" / "data"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(info: DatasetInfo, filename: str, target_dir: Path) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / filename
    errors = []
    for mirror in info.mirrors:
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(mirror + filename, timeout=30) as response, open(tmp, "wb") as out:
                out.write(response.read())
            if _md5(tmp) != info.md5[filename]:
                raise ChecksumError(f"checksum mismatch for {mirror + filename}")
            tmp.replace(target)
            return target
        except Exception as exc:  # try the next mirror
            errors.append(f"{mirror}: {exc}")
            tmp.unlink(missing_ok=True)
    raise DatasetMissingError("; ".join(errors))


CHECKSUM_FILE = "MD5SUMS"


def _local_checksums(folder: Path) -> dict[str, str]:
    """A derived root's own checksums (``MD5SUMS`` in ``md5sum`` format), {} when it has none."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")  # md5sum marks binary mode with "*"
        if len(digest) != 32 or not name:
            raise ChecksumError(f"{path}, line {number}: expected '<md5>  <file name>' as md5sum writes it")
        sums[name] = digest.lower()
    return sums


def locate_file(name: str, filename: str, root: Path | None = None, download: bool | None = None) -> Path:
    """Path of a verified dataset file, downloading it when missing and allowed."""
    info = DATASETS[name]
    root = Path(root) if root is not None else default_data_root()
    own = _local_checksums(root / info.folder / "raw").get(filename)
    candidates = [(root / info.folder / "raw" / filename, own or info.md5[filename]),
                  (_user_cache() / info.folder / "raw" / filename, info.md5[filename])]
    for path, expected_md5 in candidates:
        if path.is_file():
            if _md5(path) != expected_md5:
                raise ChecksumError(f"{path} has MD5 {_md5(path)}, expected {expected_md5}: "
                                    "delete it and let capsctl download it again")
            return path
    if download is None:
        download = os.environ.get("CAPSNET_OFFLINE", "0") not in ("1", "true", "yes")
    expected = ", ".join(SPLIT_FILES["train"] + SPLIT_FILES["test"])
    message = (f"{name} not found: expected {expected} under {root / info.folder / 'raw'} "
               "(set CAPSNET_DATA_DIR to the folder holding MNIST/raw and FashionMNIST/raw)")
    if not download:
        raise DatasetMissingError(message)
    target_dir = root / info.folder / "raw"
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        target_dir = _user_cache() / info.folder / "raw"
    try:
        return _download(info, filename, target_dir)
    except DatasetMissingError as exc:
        raise DatasetMissingError(f"{message}; download failed: {exc}") from None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#010x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return array.reshape(shape)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str, download: bool | None) -> Dataset:
    image_file, label_file = SPLIT_FILES[split]
    images = _read_idx(locate_file(name, image_file, Path(root), download))
    labels = _read_idx(locate_file(name, label_file, Path(root), download))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{name} {split}: {images.shape} images do not match {labels.shape} labels")
    return Dataset(name, split, torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def load_dataset(name: str = "mnist", split: str = "train", root: str | Path | None = None,
                 download: bool | None = None) -> Dataset:
    """Load a whole split as uint8 images (N, 28, 28) and int64 labels (N,) on the CPU.

    download: None = download when the files are missing unless CAPSNET_OFFLINE=1.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    root_path = Path(root) if root is not None else default_data_root()
    return _load_cached(name, split, str(root_path), download)
