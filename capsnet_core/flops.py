"""Training cost of a model, measured: floating-point operations per training image.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real training step (forward with
labels, the model's own loss, backward) on a batch, then divided by the batch size. The counter
sees matrix products and convolutions (the operations that dominate every model here); cheap
elementwise work (squash, softmax, ReLU) is not counted, so the figure is a lower bound that
compares models on the same footing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.base import unwrap


def training_flops_per_image(model: nn.Module, batch_size: int = 32, image_size: int = 28) -> float:
    """FLOPs of one training step per image (forward + backward), on a random batch on the model's device.

    The model is left as it was: nothing is stepped, gradients and buffers (BatchNorm's running
    statistics) are restored."""
    bare = unwrap(model)
    device = next(bare.parameters()).device
    was_training = bare.training
    grads = [p.grad for p in bare.parameters()]
    buffers = [b.detach().clone() for b in bare.buffers()]
    images = torch.rand(batch_size, 1, image_size, image_size, device=device)
    labels = torch.arange(batch_size, device=device) % 10
    bare.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = bare(images, labels)
            bare.loss(out, images, labels).backward()
        total = counter.get_total_flops()
    finally:
        for p, g in zip(bare.parameters(), grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, saved in zip(bare.buffers(), buffers, strict=True):
                b.copy_(saved)
        bare.train(was_training)
    return total / batch_size


def inference_flops_per_image(model: nn.Module, batch_size: int = 32, image_size: int = 28) -> float:
    """FLOPs of one forward pass per image, in eval mode."""
    bare = unwrap(model)
    device = next(bare.parameters()).device
    was_training = bare.training
    bare.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            bare(torch.rand(batch_size, 1, image_size, image_size, device=device))
        total = counter.get_total_flops()
    finally:
        bare.train(was_training)
    return total / batch_size
