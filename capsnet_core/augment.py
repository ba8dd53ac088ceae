"""Batched image augmentation on the training device, and fixed rotations for testing.

Every transform is one affine warp per image (``affine_grid`` + ``grid_sample``), applied to a
whole batch at once on whatever device holds it.  Presets are strings of ``+``-joined parts
that job specs can name:

    none            identity
    shift2          random translation by a whole number of pixels in [-2, 2] on each axis
                    (the tutorial's ``RandomAffine(0, translate=(0.0714, 0.0714))`` on 28x28)
    rot15           random rotation uniformly within +-15 degrees
    scale0.9-1.1    random isotropic scale in [0.9, 1.1]

e.g. ``shift2+rot15``.  Angles are in degrees, counter-clockwise, as in torchvision.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PART = re.compile(r"^(?:(?P<none>none)|shift(?P<shift>\d+)|rot(?P<rot>\d+(?:\.\d+)?)"
                   r"|scale(?P<lo>\d+(?:\.\d+)?)-(?P<hi>\d+(?:\.\d+)?))$")
PRESET_HELP = "none, shift<px> (e.g. shift2), rot<deg> (e.g. rot15), scale<lo>-<hi> (e.g. scale0.9-1.1), joined with '+'"


@dataclass(frozen=True)
class AugmentSpec:
    shift_px: int = 0
    max_rotation_deg: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        return self.shift_px == 0 and self.max_rotation_deg == 0 and self.scale_range == (1.0, 1.0)


def parse_preset(preset: str) -> AugmentSpec:
    """Parse a preset string; raises ValueError with a one-line explanation when it is invalid."""
    if not isinstance(preset, str) or not preset.strip():
        raise ValueError(f"empty augmentation preset; use {PRESET_HELP}")
    shift, rotation, scale = 0, 0.0, (1.0, 1.0)
    seen: set[str] = set()
    for part in preset.strip().split("+"):
        match = _PART.match(part.strip())
        if match is None:
            raise ValueError(f"unknown augmentation {part!r} in preset {preset!r}; use {PRESET_HELP}")
        kind = next(k for k in ("none", "shift", "rot", "lo") if match.group(k) is not None)
        if kind in seen:
            raise ValueError(f"augmentation preset {preset!r} names {part!r}'s kind twice")
        seen.add(kind)
        if kind == "shift":
            shift = int(match.group("shift"))
            if shift > 14:
                raise ValueError(f"shift of {shift} px in {preset!r} is larger than half the 28 px image")
        elif kind == "rot":
            rotation = float(match.group("rot"))
            if rotation > 180:
                raise ValueError(f"rotation range of {rotation} degrees in {preset!r} is outside [0, 180]")
        elif kind == "lo":
            lo, hi = float(match.group("lo")), float(match.group("hi"))
            if not 0.1 <= lo <= hi <= 10:
                raise ValueError(f"scale range {lo}-{hi} in {preset!r} must satisfy 0.1 <= lo <= hi <= 10")
            scale = (lo, hi)
    if "none" in seen and len(seen) > 1:
        raise ValueError(f"augmentation preset {preset!r} combines 'none' with other parts")
    return AugmentSpec(shift, rotation, scale)


def preset_for(shift_px: int = 2, max_rotation_deg: float = 0.0) -> str:
    """The canonical preset name, e.g. preset_for(2, 15) == 'shift2+rot15'."""
    parts = []
    if shift_px:
        parts.append(f"shift{shift_px}")
    if max_rotation_deg:
        parts.append(f"rot{max_rotation_deg:g}")
    return "+".join(parts) or "none"


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
