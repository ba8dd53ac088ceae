"""What every model returns, and the small protocol the training loop relies on."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ModelOutput(NamedTuple):
    """A model's forward result.

    A NamedTuple rather than a dataclass so DistributedDataParallel and torch.compile
    can flatten it like any tuple of tensors.
    """

    scores: torch.Tensor  # (B, C) higher = more likely; logits (LeNet5) or capsule lengths (CapsNet)
    capsules: torch.Tensor | None = None  # (B, C, D) digit-capsule vectors
    reconstructions: torch.Tensor | None = None  # (B, 1, 28, 28) decoder output in [0, 1]
    coupling: torch.Tensor | None = None  # (B, N_in, C) routing coefficients of the last iteration


class ClassifierModel(nn.Module):
    """Base class: models take float images in [0, 1], shape (B, 1, 28, 28)."""

    name: str = ""

    def loss(self, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar training loss averaged over the batch."""
        raise NotImplementedError


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
