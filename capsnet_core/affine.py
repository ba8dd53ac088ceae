"""The affine test suite: "affine-MNIST" generated from the MNIST test set, or genuine affNIST.

Generated affine-MNIST (never called affNIST): every MNIST test digit gets one random affine map
with affNIST's kinds of distortion and the ranges we believe affNIST uses (rotation within +-20
degrees, shear factor within +-0.2, horizontal and vertical scale independently in [0.8, 1.2], and
a translation that keeps the whole digit on the canvas; see the constants below for what is and is
not verified), drawn from a fixed seed, so the set is the same on every machine and run.

Canvas: 28x28, not affNIST's 40x40. Every model here, as in the tutorial, takes 28x28 inputs
(CapsNet's 6x6 primary grid, LeNet5's 4x4 maps, the ResNet's 7x7 stage); a 40x40 test set would
need models built and trained for 40x40 (as Sabour et al. did, padding MNIST to 40x40). On 28x28 the
translation range is what the 28x28 canvas leaves around the distorted digit (a few pixels), so this
suite mostly tests rotation, shear and scale; the README says so next to every number.

Genuine affNIST: put the test files (``test.mat`` from ``32x/transformed``, or its ``test_batches/*.mat``)
in ``<CAPSNET_DATA_DIR>/affNIST/``; they are MATLAB files holding a struct ``affNISTdata`` with
``image`` (1600 x N uint8, one 40x40 image per column, row-major) and ``label_int`` (1 x N). Each
40x40 image is cut down to the 28x28 window centred on the digit's bounding box (so affNIST's large
translations are undone; rotation, shear and scale remain), labelled "affNIST (re-centred 28x28)".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset, default_data_root
from .suites import AFFINE_MNIST, AFFNIST

# affNIST's ranges as recalled from Tieleman's page (https://www.cs.toronto.edu/~tijmen/affNIST/),
# NOT verified: the copies of that page we could search hold only its introduction (verified there:
# 40x40 images, 32 random transformations of each MNIST digit, the test set from the 10,000 MNIST
# test digits, "significant translations", MATLAB files; a tfds-style affnist builder on GitHub
# reads affNISTdata's image (1600 x N) and label_int from 32x/transformed/test_batches/). No
# source found states the rotation, shear or scale ranges; the one reproduction found
# (cybertronai.github.io/hinton-problems/affnist/) makes its own stand-in with rotation +-20 and
# scale 0.8-1.2 like these, but isotropic scale and shear +-0.1, as a synthesized fallback.
# Changing a range changes every affine-MNIST number reported so far (no test pins pixel values).
MAX_ROTATION_DEG = 20.0
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)
DEFAULT_SEED = 0
_PAD = 6  # warp on 40x40 (28 + 2 x 6, affNIST's own canvas) so nothing is cut before the digit is placed


def _bounding_boxes(images: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Per image (N, H, W): first and last row and column with a pixel above threshold."""
    ink = images > threshold
    rows, cols = ink.any(dim=2), ink.any(dim=1)  # (N, H), (N, W)
    idx_r = torch.arange(images.shape[1])
    idx_c = torch.arange(images.shape[2])
    big = images.shape[1] + images.shape[2]
    top = torch.where(rows, idx_r, big).amin(dim=1)
    bottom = torch.where(rows, idx_r, -1).amax(dim=1)
    left = torch.where(cols, idx_c, big).amin(dim=1)
    right = torch.where(cols, idx_c, -1).amax(dim=1)
    return top, bottom, left, right


def _crop_28(canvas: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """canvas (N, H, W) -> (N, 28, 28) windows with the given top-left corners."""
    n = canvas.shape[0]
    r = top.view(n, 1, 1) + torch.arange(28).view(1, 28, 1)
    c = left.view(n, 1, 1) + torch.arange(28).view(1, 1, 28)
    return canvas[torch.arange(n).view(n, 1, 1), r, c]


def _window_starts(low: torch.Tensor, high: torch.Tensor, size: int, uniform: torch.Tensor | None) -> torch.Tensor:
    """Top-left of a 28-wide window holding [low, high] inside [0, size), picked by uniform (N,) in
    [0, 1) over the choices (centred when None); centred on the box where the box is wider than 28."""
    lo = (high - 27).clamp(min=0)
    hi = low.clamp(max=size - 28)
    centred = ((low + high + 1) // 2 - 14).clamp(0, size - 28)
    span = (hi - lo + 1).clamp(min=1)
    pick = centred if uniform is None else lo + (uniform * span).long().clamp(max=span - 1)
    return torch.where(hi >= lo, pick, centred)


_CACHE: dict[tuple[str, str, int, int], Dataset] = {}


def affine_mnist(test: Dataset, seed: int = DEFAULT_SEED) -> Dataset:
    """The generated affine-MNIST test set (module doc): one distortion per test image, uint8 28x28.

    Image i's distortion depends only on (seed, i), so the first k images of a test subset get
    the same distortions as in the full set. Cached per process (it takes seconds on a CPU).
    """
    key = (test.name, test.split, len(test), seed)
    if key not in _CACHE:
        _CACHE.clear()  # one set at a time: 8 MB each
        _CACHE[key] = _generate(test, seed)
    return _CACHE[key]


def _generate(test: Dataset, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    n = len(test)
    draws = torch.rand(6, max(n, 10_000), generator=g, dtype=torch.float64)[:, :n]  # per image, not per n

    def uniform(row: int, lo: float, hi: float) -> torch.Tensor:
        return draws[row] * (hi - lo) + lo

    angle = uniform(0, -MAX_ROTATION_DEG, MAX_ROTATION_DEG) * math.pi / 180
    shear = uniform(1, -MAX_SHEAR, MAX_SHEAR)
    sx, sy = uniform(2, *SCALE_RANGE), uniform(3, *SCALE_RANGE)
    # Forward map about the centre, A = R(angle) @ Shear_x(shear) @ diag(sx, sy), in (x right, y down);
    # affine_grid wants the inverse (output -> input coordinates).
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    shear_m = torch.zeros(n, 2, 2, dtype=torch.float64)
    shear_m[:, 0, 0] = shear_m[:, 1, 1] = 1
    shear_m[:, 0, 1] = shear
    scale = torch.diag_embed(torch.stack([sx, sy], -1))
    inverse = torch.linalg.inv(rotation @ shear_m @ scale)
    theta = torch.cat([inverse, torch.zeros(n, 2, 1, dtype=torch.float64)], dim=2).float()
    size = 28 + 2 * _PAD
    canvas = []
    for start in range(0, n, 2000):  # bounded memory: 2,000 x 40 x 40 floats at a time
        x = F.pad(test.images[start:start + 2000].float().div(255).unsqueeze(1), (_PAD,) * 4)
        grid = F.affine_grid(theta[start:start + 2000], list(x.shape), align_corners=False)
        canvas.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0])
    warped = torch.cat(canvas)  # (N, 40, 40)
    top, bottom, left, right = _bounding_boxes(warped, threshold=0.1)
    rows = _window_starts(top, bottom, size, draws[4].float())
    cols = _window_starts(left, right, size, draws[5].float())
    images = (_crop_28(warped, rows, cols) * 255).round().clamp(0, 255).to(torch.uint8)
    return Dataset(test.name, f"test-{AFFINE_MNIST}-seed{seed}", images, test.labels.clone())


def affnist_files(root: str | Path | None = None) -> list[Path]:
    """The genuine affNIST test files under ``<root>/affNIST`` (empty when the user has none)."""
    folder = Path(root if root is not None else default_data_root()) / "affNIST"
    single = folder / "test.mat"
    if single.is_file():
        return [single]
    batches = folder / "test_batches"
    return sorted(batches.glob("*.mat"), key=lambda p: (len(p.stem), p.stem)) if batches.is_dir() else []


def load_affnist_test(root: str | Path | None = None) -> Dataset:
    """Genuine affNIST test data, each image re-centred into 28x28 (module doc).

    Raises FileNotFoundError when the files are absent and ValueError when they are not affNIST's layout.
    """
    from scipy.io import loadmat  # scipy comes with e2cnn; only needed for genuine affNIST

    files = affnist_files(root)
    if not files:
        raise FileNotFoundError(f"no affNIST test files: expected test.mat or test_batches/*.mat under "
                                f"{Path(root if root is not None else default_data_root()) / 'affNIST'}")
    images, labels = [], []
    for path in files:
        try:
            data = loadmat(path)["affNISTdata"]
            pixels = np.asarray(data["image"][0, 0])
            label = np.asarray(data["label_int"][0, 0]).reshape(-1)
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"{path} is not an affNIST file (struct affNISTdata with image and label_int): {err}") \
                from None
        if pixels.shape[0] != 1600 or pixels.shape[1] != label.shape[0] or label.min() < 0 or label.max() > 9:
            raise ValueError(f"{path}: expected image 1600 x N and N labels in 0..9, got {pixels.shape} "
                             f"and {label.shape}")
        images.append(torch.from_numpy(np.ascontiguousarray(pixels.T.reshape(-1, 40, 40)).astype(np.uint8)))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    canvas = torch.cat(images)
    top, bottom, left, right = _bounding_boxes(canvas.float(), threshold=25)
    crops = _crop_28(canvas, _window_starts(top, bottom, 40, None), _window_starts(left, right, 40, None))
    return Dataset("mnist", f"test-{AFFNIST}", crops.contiguous(), torch.cat(labels))


def affine_test_set(test: Dataset, root: str | Path | None = None, seed: int = DEFAULT_SEED) -> tuple[str, Dataset]:
    """The affine suite's test set and its honest name: genuine affNIST when present, else affine-MNIST."""
    if test.name == "mnist" and affnist_files(root):
        return AFFNIST, load_affnist_test(root)
    return AFFINE_MNIST, affine_mnist(test, seed)
