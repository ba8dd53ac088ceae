"""Named test suites beyond a few fixed angles, importable without torch.

``rotation``: the test set rotated 0, 15, ..., 180 degrees (13 angles), summarised by the area under
the accuracy-against-angle curve: the trapezoid rule over [0, 180] divided by 180, i.e. the mean
accuracy over the half circle with linear interpolation between the measured angles. 1.0 = perfect
at every angle; a classifier that guesses scores 0.1. Only curves that hold every suite angle get
an AUC, so two AUCs always integrate the same points.

``affine``: the MNIST test set under affNIST's kinds of affine distortion (``capsnet_core.affine``):
generated "affine-MNIST" with a fixed seed, or genuine affNIST when the user has its test files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

EVAL_SUITES = ("rotation", "affine")
# The suites' one-number results (``capsnet_core.evaluate.evaluate_suites`` keys): the rotation AUC,
# and the affine suite's accuracy on whichever set it used. Bounded, so they can be metric labels.
ROTATION_AUC = "rotation_auc"
AFFINE_MNIST = "affine-mnist"  # the affine suite's generated test set
AFFNIST = "affnist"  # genuine affNIST, when present
SUITE_RESULTS = (ROTATION_AUC, AFFINE_MNIST, AFFNIST)
ROTATION_SUITE_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))


def angle_key(angle: float) -> str:
    """15.0 -> '15', 7.5 -> '7.5': stable JSON keys and Prometheus label values."""
    return f"{float(angle):g}"


def check_suites(suites: Iterable[str]) -> list[str]:
    """Validated, de-duplicated suite names; ValueError with one line otherwise."""
    out: list[str] = []
    for name in suites:
        if name not in EVAL_SUITES:
            raise ValueError(f"unknown test suite {name!r}; choose from {', '.join(EVAL_SUITES)}")
        if name in out:
            raise ValueError(f"test suite {name!r} named twice")
        out.append(name)
    return out


def with_suite_angles(angles: Iterable[float], suites: Iterable[str]) -> list[float]:
    """The angles to evaluate: the given ones, plus the rotation suite's when it is asked for."""
    out = [float(a) for a in angles]
    if "rotation" in suites:
        out += [a for a in ROTATION_SUITE_ANGLES if a not in out]
    return out


def rotation_auc(curve: Mapping[Any, Any]) -> float | None:
    """Normalised area under accuracy-against-angle over [0, 180] (see the module doc), or None
    when the curve lacks one of the suite's angles. curve: {angle or its text: accuracy 0..1}."""
    points: dict[float, float] = {}
    for angle, accuracy in curve.items():
        try:
            points[float(angle)] = float(accuracy)
        except (TypeError, ValueError):
            continue
    if any(a not in points for a in ROTATION_SUITE_ANGLES):
        return None
    xs = sorted(a for a in points if 0.0 <= a <= 180.0)
    area = sum((x1 - x0) * (points[x0] + points[x1]) / 2 for x0, x1 in zip(xs, xs[1:], strict=False))
    return area / 180.0
