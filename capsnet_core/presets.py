"""Augmentation presets: names a job spec can refer to, parsed without importing torch.

Presets are ``+``-joined parts:

    none            identity
    shift2          random translation by a whole number of pixels in [-2, 2] on each axis
                    (the tutorial's ``RandomAffine(0, translate=(0.0714, 0.0714))`` on 28x28)
    rot15           random rotation uniformly within +-15 degrees
    scale0.9-1.1    random isotropic scale in [0.9, 1.1]

e.g. ``shift2+rot15``. ``capsnet_core.augment`` applies them to batches on the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
