"""Evaluation: accuracy, per-class accuracy, the confusion matrix and the rotation-robustness curve."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .augment import rotate
from .data import Dataset
from .models.base import unwrap
from .suites import ROTATION_AUC, rotation_auc


@dataclass
class EvalResult:
    angle: float
    accuracy: float
    loss: float
    per_class: list[float] = field(default_factory=list)  # accuracy per class index
    count: int = 0
    confusion: list[list[int]] = field(default_factory=list)  # [true class][predicted class] image counts

    def to_dict(self) -> dict:
        return {"angle": self.angle, "accuracy": self.accuracy, "loss": self.loss,
                "per_class": self.per_class, "count": self.count, "confusion": self.confusion}


@dataclass(frozen=True)
class Confusion:
    """One off-diagonal cell: ``share`` of the images of class ``true`` were predicted ``predicted``."""

    true: int
    predicted: int
    count: int
    share: float

    def describe(self, angle: str | None = None) -> str:
        where = f" at {float(angle):g}°" if angle is not None else ""
        return f"{self.true}→{self.predicted}{where}: {100 * self.share:.0f} % of {self.true}s ({self.count} images)"


def top_confusions(confusion: list[list[int]], k: int = 3) -> list[Confusion]:
    """The k largest mistakes, by the share of their true class they take (ties: more images first)."""
    cells = []
    for true, row in enumerate(confusion):
        images = sum(row)
        for predicted, count in enumerate(row):
            if predicted != true and count > 0:
                cells.append(Confusion(true, predicted, int(count), count / images))
    return sorted(cells, key=lambda c: (-c.share, -c.count, c.true, c.predicted))[:k]


def autocast_context(device: torch.device, amp: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def cpu_threads(threads: int, device: torch.device) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0: unchanged; no effect off the CPU).

    Under DDP only rank 0 evaluates while the other ranks wait at the next barrier, so rank 0 may
    use the cores they hold on its machine instead of one."""
    before = torch.get_num_threads()
    change = threads > 0 and torch.device(device).type == "cpu" and threads != before
    if change:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)


def configure_backends(device: torch.device) -> None:
    """Backend switches for running on `device`: cuDNN autotuning on CUDA, where every batch of
    a run has the same shape, so the one-off search of the first steps pays for itself."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500, angle: float = 0.0,
            amp: bool = True) -> torch.Tensor:
    """Predicted class per image; images uint8 (N, 28, 28) or float, rotated by `angle` first."""
    model = unwrap(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, images.shape[0], batch_size):
        x = rotate(images[start:start + batch_size].to(device, non_blocking=True), angle)
        with autocast_context(device, amp):
            predictions.append(model(x).scores.argmax(dim=1))
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=device)


@torch.no_grad()
def evaluation_totals(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                      angle: float = 0.0, num_classes: int = 10,
                      amp: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hits per class, images per class and the summed fp32 loss, as tensors on the model's device."""
    confusion, loss_sum = confusion_totals(model, images, labels, batch_size, angle, num_classes, amp)
    return confusion.diagonal().clone(), confusion.sum(dim=1), loss_sum


@torch.no_grad()
def confusion_totals(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                     angle: float = 0.0, num_classes: int = 10,
                     amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The (true x predicted) count matrix and the summed fp32 loss, as tensors on the model's device.

    Nothing here reads a value back to the host, so a GPU never waits for the CPU between
    batches; ``evaluate`` synchronises once at the end.
    """
    bare = unwrap(model)
    device = next(bare.parameters()).device
    was_training = bare.training
    bare.eval()
    confusion = torch.zeros(num_classes * num_classes, device=device)
    loss_sum = torch.zeros((), device=device)
    for start in range(0, images.shape[0], batch_size):
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        x = rotate(images[start:start + batch_size].to(device, non_blocking=True), angle)
        with autocast_context(device, amp):
            out = bare(x)
            loss_sum += bare.loss(out, x, y).float() * y.shape[0]
        cell = y * num_classes + out.scores.argmax(dim=1)  # row = true class, column = prediction
        confusion.index_add_(0, cell, torch.ones_like(cell, dtype=confusion.dtype))
    bare.train(was_training)
    return confusion.view(num_classes, num_classes), loss_sum


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             angle: float = 0.0, num_classes: int = 10, amp: bool = True) -> EvalResult:
    """Accuracy, mean loss, per-class accuracy and the confusion matrix on the images rotated by `angle` degrees."""
    confusion, loss_sum = confusion_totals(model, images, labels, batch_size, angle, num_classes, amp)
    correct, total = confusion.diagonal(), confusion.sum(dim=1)
    n = int(total.sum().item())
    per_class = (correct / total.clamp(min=1)).tolist()
    return EvalResult(angle=float(angle), accuracy=float(correct.sum().item() / max(n, 1)),
                      loss=float(loss_sum.item()) / max(n, 1), per_class=per_class, count=n,
                      confusion=confusion.long().tolist())


def per_class_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, angle: float = 0.0,
                       batch_size: int = 500) -> list[float]:
    return evaluate(model, images, labels, batch_size=batch_size, angle=angle).per_class


def evaluate_rotations(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       angles: Iterable[float], batch_size: int = 500) -> dict[float, float]:
    """The rotation-robustness curve: {angle: accuracy} on the test set rotated by each angle."""
    return {float(a): evaluate(model, images, labels, batch_size=batch_size, angle=a).accuracy for a in angles}


def evaluate_suites(model: nn.Module, test: Dataset, suites: Iterable[str], rotation: dict[str, float],
                    batch_size: int = 500, amp: bool = True, data_root: str | None = None) -> dict[str, float]:
    """The one-number summaries of the named test suites (``capsnet_core.suites``).

    rotation: the per-angle accuracies already measured ({"15": 0.97, ...}); the rotation suite's
    AUC is computed from them. Keys: "rotation_auc", and "affine-mnist" (generated) or "affnist"
    (genuine, when its files are under the data root): accuracy on that set.
    """
    from .affine import affine_test_set

    out: dict[str, float] = {}
    suites = list(suites)
    if "rotation" in suites:
        auc = rotation_auc(rotation)
        if auc is not None:
            out[ROTATION_AUC] = auc
    if "affine" in suites:
        name, affine = affine_test_set(test.to("cpu"), root=data_root)
        out[name] = evaluate(model, affine.images, affine.labels, batch_size=batch_size, amp=amp).accuracy
    return out
