"""capsnet_core: LeNet5 and a dynamic-routing CapsNet, shifted/rotated MNIST, training and evaluation.

A pure ML library: it imports torch (and matplotlib for plots) but nothing of the service
(no Redis, Ray, click or Prometheus), so it runs anywhere torch does.
"""

from .augment import AugmentSpec, augment_batch, parse_preset, preset_for, rotate, shift
from .models import MODEL_NAMES, ModelOutput, build_model, count_parameters, unwrap

__all__ = [
    "MODEL_NAMES", "AugmentSpec", "ModelOutput", "augment_batch", "build_model", "count_parameters",
    "parse_preset", "preset_for", "rotate", "shift", "unwrap",
]
