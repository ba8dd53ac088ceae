"""LeNet5 exactly as in the tutorial: two 5x5 convolutions with average pooling, three FC layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierModel, ModelOutput
from .configs import LeNet5Config


class LeNet5(ClassifierModel):
    name = "lenet5"

    def __init__(self, config: LeNet5Config | None = None) -> None:
        super().__init__()
        self.config = config = config or LeNet5Config()
        self.conv1 = nn.Conv2d(1, config.conv1_channels, 5)
        self.conv2 = nn.Conv2d(config.conv1_channels, config.conv2_channels, 5)
        self.pool = nn.AvgPool2d(2, 2)
        self.fc1 = nn.Linear(config.conv2_channels * 4 * 4, config.hidden1)
        self.fc2 = nn.Linear(config.hidden1, config.hidden2)
        self.fc3 = nn.Linear(config.hidden2, config.num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        x = (images - 0.5) / 0.5  # the tutorial's Normalize((0.5,), (0.5,)), done inside
        x = self.pool(F.relu(self.conv1(x)))  # (B, 6, 12, 12)
        x = self.pool(F.relu(self.conv2(x)))  # (B, 16, 4, 4)
        x = x.flatten(1)  # (B, 256)
        x = F.relu(self.fc1(x))  # (B, 120)
        x = F.relu(self.fc2(x))  # (B, 84)
        return ModelOutput(scores=self.fc3(x))  # (B, 10) logits

    def loss(self, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.scores.float(), labels)
