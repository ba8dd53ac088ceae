"""Titles and legend labels of the accuracy plots, one wording for the worker's plots,
``results --plot`` and ``compare --plot``: what ran (job name or id, kind, model and its config)
and on what budget (epochs x training images, augmentation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.spec.types import TRAIN_IMAGES


def budget_text(spec: Mapping[str, Any]) -> str:
    """``4 epochs × 20,000 images, shift2+rot15`` (what a train spec trained on); "" when unknown."""
    epochs = spec.get("epochs")
    if not isinstance(epochs, int):
        return ""
    subset = spec.get("train_subset")
    images = subset if isinstance(subset, int) and subset > 0 else TRAIN_IMAGES
    val = spec.get("val_split")
    if isinstance(val, int) and val > 0 and not (isinstance(subset, int) and subset > 0):
        images -= val
    augment = spec.get("augment")
    return f"{epochs} epoch{'s' if epochs != 1 else ''} × {images:,} images" + (f", {augment}" if augment else "")


def model_text(model: str | None, spec: Mapping[str, Any]) -> str:
    """``capsnet (routing_iterations=1)``: the model and its config overrides, if any."""
    overrides = spec.get("model_config")
    if isinstance(overrides, Mapping) and overrides:
        return f"{model} ({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})"
    return str(model or "?")


def plot_title(job: str, kind: str, model: str | None, spec: Mapping[str, Any]) -> str:
    """``upright-run · train capsnet · 4 epochs × 20,000 images, shift2`` (job = name or id)."""
    parts = [job, f"{kind} {model_text(model, spec)}".strip(), budget_text(spec)]
    return " · ".join(p for p in parts if p)


def curve_label(job: str, kind: str, model: str | None, spec: Mapping[str, Any],
                rotation_auc: float | None = None) -> str:
    """A legend entry: ``capsnet, train upright-run, 4 epochs × 20,000 images, AUC 45.3 %``."""
    parts = [model_text(model, spec), f"{kind} {job}", budget_text(spec)]
    if isinstance(rotation_auc, int | float):
        parts.append(f"AUC {100 * rotation_auc:.1f} %")
    return ", ".join(p for p in parts if p)
