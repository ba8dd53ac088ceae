"""Batched image augmentation on the training device, and fixed rotations for testing.

Every transform is one affine warp per image (``affine_grid`` + ``grid_sample``), applied to a
whole batch at once on whatever device holds it.  The presets that name them (``shift2+rot15``)
are parsed in ``capsnet_core.presets``.  Angles are in degrees, counter-clockwise, as in
torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .presets import PRESET_HELP, AugmentSpec, parse_preset, preset_for

__all__ = ["PRESET_HELP", "AugmentSpec", "augment_batch", "parse_preset", "preset_for", "rotate", "shift"]


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) or (B, 1, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _warp(images: torch.Tensor, angle_rad: torch.Tensor, scale: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Rotate by angle (counter-clockwise), scale about the centre, then translate by shift_px (x, y).

    angle_rad, scale: (B,); shift_px: (B, 2). affine_grid wants the map from output to input
    coordinates in [-1, 1] (x right, y down), i.e. the inverse transform.
    """
    b, _, h, w = images.shape
    cos, sin = torch.cos(angle_rad) / scale, torch.sin(angle_rad) / scale
    # Inverse of "rotate CCW on screen (y down) by a": [[cos, -sin], [sin, cos]] in (x, y-down).
    tx = shift_px[:, 0] * 2.0 / w
    ty = shift_px[:, 1] * 2.0 / h
    theta = torch.stack([
        torch.stack([cos, -sin, -(cos * tx - sin * ty)], dim=1),
        torch.stack([sin, cos, -(sin * tx + cos * ty)], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random augmentation of a batch. images: uint8 or float, (B, [1,] 28, 28) -> float (B, 1, 28, 28)."""
    x = _as_float_images(images)
    if spec.is_identity:
        return x
    b, device = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, device=device, generator=generator) * (hi - lo) + lo

    angle = uniform(-spec.max_rotation_deg, spec.max_rotation_deg) * (math.pi / 180.0)
    scale = uniform(*spec.scale_range)
    if spec.shift_px:
        # Whole pixels, like RandomAffine's rounding: uniform over {-s, ..., s}.
        shift = torch.randint(-spec.shift_px, spec.shift_px + 1, (b, 2), device=device,
                              generator=generator).float()
    else:
        shift = torch.zeros(b, 2, device=device)
    return _warp(x, angle, scale, shift)


def rotate(images: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate every image by the same angle (degrees, counter-clockwise) with bilinear sampling."""
    x = _as_float_images(images)
    if angle_deg % 360 == 0:
        return x
    b = x.shape[0]
    angle = torch.full((b,), math.radians(angle_deg), device=x.device)
    return _warp(x, angle, torch.ones(b, device=x.device), torch.zeros(b, 2, device=x.device))


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translate every image by whole pixels (dx right, dy down), filling with zeros."""
    x = _as_float_images(images)
    b = x.shape[0]
    offsets = torch.tensor([[float(dx), float(dy)]], device=x.device).expand(b, 2)
    return _warp(x, torch.zeros(b, device=x.device), torch.ones(b, device=x.device), offsets)
