"""Model registry: ``build_model(name, **config)`` returns a full-size model unless told otherwise."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import ClassifierModel, ModelOutput, count_parameters, unwrap
from .capsnet import CapsNet, CapsNetConfig, margin_loss, squash
from .lenet5 import LeNet5, LeNet5Config

# name -> (model class, config dataclass)
MODELS: dict[str, tuple[type[ClassifierModel], type]] = {
    "capsnet": (CapsNet, CapsNetConfig),
    "lenet5": (LeNet5, LeNet5Config),
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(MODELS))


def model_config_fields(name: str) -> dict[str, Any]:
    """The config fields of a model and their defaults (for validation in job specs)."""
    _, config_cls = _lookup(name)
    return {f.name: getattr(config_cls(), f.name) for f in dataclasses.fields(config_cls)}


def _lookup(name: str) -> tuple[type[ClassifierModel], type]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def build_model(name: str, **config: Any) -> ClassifierModel:
    """Build a registered model; keyword arguments override fields of its config dataclass."""
    model_cls, config_cls = _lookup(name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown {name} config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "decoder_hidden" in config:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
    return model_cls(config_cls(**config))


__all__ = [
    "MODELS", "MODEL_NAMES", "CapsNet", "CapsNetConfig", "ClassifierModel", "LeNet5", "LeNet5Config",
    "ModelOutput", "build_model", "count_parameters", "margin_loss", "model_config_fields", "squash", "unwrap",
]
