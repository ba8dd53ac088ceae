"""capsnet_core: LeNet5 and a dynamic-routing CapsNet, shifted/rotated MNIST, training and evaluation.

A pure ML library: it imports torch (and matplotlib for plots) but nothing of the service
(no Redis, Ray, click or Prometheus), so it runs anywhere torch does.

    from capsnet_core import build_model, load_dataset, TrainConfig, fit, evaluate_rotations
    model = build_model("capsnet")                       # full size, 8,215,568 parameters
    result = fit(model, load_dataset("mnist", "train"), load_dataset("mnist", "test"),
                 TrainConfig(epochs=10, augment="shift2", eval_angles=(0, 15, 35)))
"""

from .augment import AugmentSpec, augment_batch, parse_preset, preset_for, rotate, shift
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .data import DATASET_NAMES, Dataset, DatasetMissingError, load_dataset
from .evaluate import EvalResult, evaluate, evaluate_rotations, per_class_accuracy, predict
from .models import MODEL_NAMES, ModelOutput, build_model, count_parameters, unwrap
from .train import FitResult, TrainConfig, TrainingStopped, angle_key, fit, train_one_epoch

__all__ = [
    "DATASET_NAMES", "MODEL_NAMES", "AugmentSpec", "Dataset", "DatasetMissingError", "EvalResult", "FitResult",
    "ModelOutput", "TrainConfig", "TrainingStopped", "angle_key", "augment_batch", "build_model",
    "count_parameters", "evaluate", "evaluate_rotations", "fit", "load_checkpoint", "load_dataset", "load_model",
    "parse_preset", "per_class_accuracy", "predict", "preset_for", "rotate", "save_checkpoint", "shift",
    "train_one_epoch", "unwrap",
]
