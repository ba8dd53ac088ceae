"""capsnet_core: the models (LeNet5, the 2017 dynamic-routing CapsNet, Efficient-CapsNet, a ResNet,
a C8-equivariant CNN), shifted/rotated/affine MNIST, training, evaluation, test suites and plots.

A pure ML library: it imports torch (and matplotlib for plots) but nothing of the service
(no Redis, Ray, click or Prometheus), so it runs anywhere torch does.

    from capsnet_core import build_model, load_dataset, TrainConfig, fit, evaluate_rotations
    model = build_model("capsnet")                       # full size, 8,215,568 parameters
    result = fit(model, load_dataset("mnist", "train"), load_dataset("mnist", "test"),
                 TrainConfig(epochs=10, augment="shift2", eval_angles=(0, 15, 35)))

Names are imported lazily, so ``capsnet_core.presets`` and ``capsnet_core.models.configs``
(what a job spec needs to be validated) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "augment": ["augment_batch", "rotate", "shift"],
    "presets": ["AugmentSpec", "parse_preset", "preset_for"],
    "checkpoint": ["load_checkpoint", "load_model", "save_checkpoint"],
    "data": ["DATASET_NAMES", "Dataset", "DatasetMissingError", "load_dataset"],
    "evaluate": ["Confusion", "EvalResult", "evaluate", "evaluate_rotations", "per_class_accuracy", "predict",
                 "top_confusions"],
    "models": ["MODEL_NAMES", "ModelOutput", "build_model", "count_parameters", "unwrap"],
    "train": ["FitResult", "TrainConfig", "TrainingStopped", "angle_key", "fit", "train_one_epoch"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
