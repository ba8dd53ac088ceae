"""Training FLOPs per image, counted by torch's FlopCounterMode, checked against a hand count."""

from __future__ import annotations

import pytest
import torch

from capsnet_core import build_model
from capsnet_core.flops import inference_flops_per_image, training_flops_per_image


def lenet5_forward_flops(c1: int = 6, c2: int = 16, h1: int = 120, h2: int = 84) -> int:
    """2 x multiply-accumulates of LeNet5's two convolutions and three linear layers."""
    conv1 = 24 * 24 * c1 * 1 * 5 * 5
    conv2 = 8 * 8 * c2 * c1 * 5 * 5
    fc = c2 * 4 * 4 * h1 + h1 * h2 + h2 * 10
    return 2 * (conv1 + conv2 + fc)


def test_lenet5_forward_count_matches_the_hand_count_and_training_costs_two_to_three_forwards() -> None:
    model = build_model("lenet5")
    forward = inference_flops_per_image(model)
    assert forward == lenet5_forward_flops()
    train = training_flops_per_image(model)
    # backward: grad of the weights (1x forward) and of every input but the image's (< 1x).
    assert 2.0 * forward < train < 3.0 * forward


def test_the_count_is_per_image_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("effcaps")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert training_flops_per_image(model, batch_size=8) == pytest.approx(training_flops_per_image(model, batch_size=32))
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running statistics too
    assert training_flops_per_image(build_model("capsnet")) > 100 * training_flops_per_image(build_model("lenet5"))
