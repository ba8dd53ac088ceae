"""Augmentation: rotation agrees with torchvision, shifts are whole pixels, presets, reproducibility."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from capsnet_core.augment import AugmentSpec, augment_batch, parse_preset, preset_for, rotate, shift
from capsnet_core.data import load_dataset


@pytest.fixture(scope="module")
def digits(data_dir) -> torch.Tensor:
    return load_dataset("mnist", "test", root=data_dir).images[:64]


@pytest.mark.parametrize("angle", [15.0, 35.0, -40.0, 90.0, 180.0])
def test_fixed_rotation_matches_torchvision(digits: torch.Tensor, angle: float) -> None:
    ours = rotate(digits, angle)
    reference = TF.rotate(digits.unsqueeze(1).float() / 255, angle, interpolation=InterpolationMode.BILINEAR)
    assert (ours - reference).abs().max().item() < 1e-3


def test_zero_rotation_is_the_identity(digits: torch.Tensor) -> None:
    assert torch.equal(rotate(digits, 0.0), digits.unsqueeze(1).float() / 255)
    assert torch.equal(augment_batch(digits, AugmentSpec()), digits.unsqueeze(1).float() / 255)


def test_rotation_moves_the_ink(digits: torch.Tensor) -> None:
    upright = digits.unsqueeze(1).float() / 255
    assert (rotate(digits, 35) - upright).abs().mean() > 0.05


@pytest.mark.parametrize(("dx", "dy"), [(2, 0), (0, -2), (-1, 1), (2, 2)])
def test_shift_moves_pixels_by_whole_pixels(digits: torch.Tensor, dx: int, dy: int) -> None:
    x = digits.unsqueeze(1).float() / 255
    moved = shift(digits, dx, dy)
    expected = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    # Zero the wrapped-around border that roll brings in; shift fills it with zeros.
    if dx > 0:
        expected[..., :, :dx] = 0
    elif dx < 0:
        expected[..., :, dx:] = 0
    if dy > 0:
        expected[..., :dy, :] = 0
    elif dy < 0:
        expected[..., dy:, :] = 0
    assert (moved - expected).abs().max().item() < 1e-4


def test_random_shift_is_whole_pixel_and_bounded(digits: torch.Tensor) -> None:
    out = augment_batch(digits, parse_preset("shift2"), torch.Generator().manual_seed(0))
    x = digits.unsqueeze(1).float() / 255
    for i in range(16):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if (shift(x[i:i + 1], dx, dy) - out[i:i + 1]).abs().max() < 1e-4]
        assert matches, f"image {i} is not a whole-pixel shift within 2 px"


def test_augmentation_is_reproducible_from_a_seed(digits: torch.Tensor) -> None:
    spec = parse_preset("shift2+rot15+scale0.9-1.1")
    a = augment_batch(digits, spec, torch.Generator().manual_seed(7))
    b = augment_batch(digits, spec, torch.Generator().manual_seed(7))
    c = augment_batch(digits, spec, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_presets_parse_and_compose() -> None:
    assert parse_preset("none") == AugmentSpec()
    assert parse_preset("shift2") == AugmentSpec(shift_px=2)
    assert parse_preset("shift2+rot15") == AugmentSpec(shift_px=2, max_rotation_deg=15.0)
    assert parse_preset("rot7.5+scale0.9-1.1") == AugmentSpec(0, 7.5, (0.9, 1.1))
    assert preset_for(2, 0) == "shift2" and preset_for(2, 35) == "shift2+rot35" and preset_for(0, 0) == "none"


@pytest.mark.parametrize(("preset", "message"), [
    ("", "empty"), ("blur3", "unknown augmentation 'blur3'"), ("shift2+shift3", "twice"),
    ("rot200", "outside"), ("scale2-1", "scale range"), ("none+shift2", "combines 'none'"), ("shift20", "larger"),
])
def test_bad_presets_are_clear_errors(preset: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_preset(preset)
