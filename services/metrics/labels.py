"""Prometheus label values for capsctl's metrics: bounded (``label_value``) so that no job id,
model name or outcome can grow a series' cardinality or break the exposition format."""

from __future__ import annotations

import re

_LABEL_RE = re.compile(r"[^a-z0-9_.:+-]+")
_MAX_LABEL_LEN = 40


def label_value(value: object) -> str:
    """A bounded label value: lower case, ``[a-z0-9_.:+-]`` only, at most 40 characters; "none"
    when nothing is left (empty, None, "?")."""
    text = _LABEL_RE.sub("_", str(value).strip().lower())[:_MAX_LABEL_LEN]
    return text if text.strip("_") and value is not None else "none"


def angle_label(angle: object) -> str:
    """Evaluation angle as a label: 35 / 35.0 / "35" -> "35", 7.5 -> "7.5"."""
    try:
        return f"{float(angle):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return label_value(angle)
