"""GPU amounts: whole GPUs, or a fraction of one GPU (Ray's fractional GPU resources).

A job may ask for a fraction in (0, 1) of a GPU (trials or a single rank that share a card) or a
whole number of GPUs (one data-parallel rank per GPU). Amounts are kept to milli-GPUs: sums such
as ``0.1 * 3`` come out as ``0.30000000000000004`` in floats, so every amount is rounded to
thousandths once (``gpu_amount``) and written as short canonical text (``gpu_text``), which is
what the queue stores and indexes by. Whole amounts stay ints, so records and keys of whole-GPU
jobs read as before (``1``, never ``1.0``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field, PlainSerializer, Strict

MILLI = 1000  # the finest fraction a job may ask for is 1/MILLI of a GPU
# Slack for comparing amounts read back from Ray or Redis as floats (below half a milli-GPU).
GPU_EPSILON = 1e-6


def to_milli(value: float) -> int:
    """The amount in whole milli-GPUs (0.125 -> 125)."""
    return round(float(value) * MILLI)


def gpu_amount(value: float) -> int | float:
    """``value`` rounded to milli-GPUs: an int when whole (1.0 -> 1), else a float (0.5)."""
    milli = to_milli(value)
    return milli // MILLI if milli % MILLI == 0 else milli / MILLI


def gpu_text(value: float) -> str:
    """Canonical text of an amount, as the queue stores it: ``"0"``, ``"2"``, ``"0.125"``."""
    return repr(gpu_amount(value))


def fits(need: float, have: float) -> bool:
    """Whether ``need`` GPUs fit in ``have``, comparing in milli-GPUs (no float rounding)."""
    return to_milli(need) <= to_milli(have)


def _checker(whole_max: int, allows: str) -> Any:
    def check(value: float) -> int | float:
        shown = repr(int(value)) if math.isfinite(value) and value == int(value) else repr(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be {allows} (got {shown})")
        milli = to_milli(value)
        if abs(value * MILLI - milli) > 1e-6:
            raise ValueError(f"must be {allows}; fractions in steps of 1/{MILLI} (got {shown})")
        if milli > MILLI and milli % MILLI:
            raise ValueError(f"more than one GPU means one data-parallel rank per whole GPU; "
                             f"use an integer, or a fraction below 1 (got {shown})")
        if milli > whole_max * MILLI:
            raise ValueError(f"must be {allows} (got {shown})")
        return gpu_amount(value)
    return check


def allows_text(whole_max: int) -> str:
    """What a GPU field allows, in words."""
    wholes = "0, 1" if whole_max == 1 else f"an integer in 0..{whole_max}"
    return f"{wholes} or a fraction in (0, 1)"


def gpu_count(whole_max: int) -> Any:
    """A field type: 0..``whole_max`` whole GPUs or a fraction in (0, 1) of one (strict: ``"2"``
    and ``true`` are refused); the value is canonical (``gpu_amount``)."""
    allows = allows_text(whole_max)
    # A strict float accepts ints too; the serializer writes whole amounts as ints (2, not 2.0).
    return Annotated[float, Strict(), Field(allow_inf_nan=False, json_schema_extra={"allows": allows}),
                     AfterValidator(_checker(whole_max, allows)), PlainSerializer(gpu_amount)]


__all__ = ["GPU_EPSILON", "MILLI", "allows_text", "fits", "gpu_amount", "gpu_count", "gpu_text", "to_milli"]
