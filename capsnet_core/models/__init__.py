"""Model registry: ``build_model(name, **config)`` returns a full-size model unless told otherwise.

Names and configs (``configs``) import without torch; the models themselves load on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from .configs import (
    MODEL_CONFIGS,
    MODEL_NAMES,
    SIZE_ESTIMATORS,
    CapsNetConfig,
    LeNet5Config,
    config_class,
    model_config_fields,
)

if TYPE_CHECKING:
    from .base import ClassifierModel

# name -> "module:class" of the model, imported lazily.
MODELS: dict[str, str] = {"capsnet": "capsnet:CapsNet", "lenet5": "lenet5:LeNet5", "effcaps": "effcaps:EfficientCapsNet",
                          "resnet": "resnet:PreActResNet", "c8cnn": "c8cnn:C8CNN"}

_LAZY = {"CapsNet": "capsnet", "LeNet5": "lenet5", "margin_loss": "capsnet", "squash": "capsnet",
         "ClassifierModel": "base", "ModelOutput": "base", "count_parameters": "base", "unwrap": "base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(name: str, **config: Any) -> ClassifierModel:
    """Build a registered model; keyword arguments override fields of its config dataclass."""
    config_cls = config_class(name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown {name} config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "decoder_hidden" in config:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
    module_name, class_name = MODELS[name].split(":")
    model_cls = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    return model_cls(config_cls(**config))


def model_reconstructs(name: str, **config: Any) -> bool:
    """Whether a model of this config draws reconstructions: its config declares it
    (``reconstructs``); configs that do not declare it draw none."""
    if "decoder_hidden" in config:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
    return bool(getattr(config_class(name)(**config), "reconstructs", False))


def estimate_model_size(name: str, **config: Any) -> tuple[int, int | None]:
    """(parameters, activation floats per sample or None) of a model config, without allocating
    it: by formula where the model has one (no torch import), else built on the meta device."""
    if "decoder_hidden" in config:
        config["decoder_hidden"] = tuple(config["decoder_hidden"])
    estimator = SIZE_ESTIMATORS.get(name)
    if estimator is not None:
        return estimator(config_class(name)(**config))
    import torch

    with torch.device("meta"):
        model = build_model(name, **config)
    return sum(p.numel() for p in model.parameters()), None


__all__ = [
    "MODELS", "MODEL_CONFIGS", "MODEL_NAMES", "CapsNet", "CapsNetConfig", "ClassifierModel", "LeNet5",
    "LeNet5Config", "ModelOutput", "build_model", "config_class", "count_parameters", "estimate_model_size", "margin_loss",
    "model_config_fields", "model_reconstructs", "squash", "unwrap",
]
