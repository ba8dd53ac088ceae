"""Efficient-CapsNet after Mazzia, Salvetti & Chiaberge, "Efficient-CapsNet: capsule network with
self-attention routing" (Scientific Reports 11, 2021): their MNIST network, 161,824 parameters.

Four convolutions, each ReLU then normalisation (28 -> 24 -> 22 -> 20 -> 9 px; 32, 64, 64, 128
channels) -> primary capsules from one 9x9 depthwise convolution over the 9x9 map (128 channels
-> 16 capsules of 8-D) -> fully connected capsules (10 x 16-D) with self-attention routing:
no iterations, one softmax per input capsule over the classes. Class score = capsule length.

Their squash is sharper than Sabour et al.'s near zero: squash(s) = (1 - e^(-|s|)) s / |s|.

Initialisation follows the official Keras graph: the four convolutions he_normal (a normal
truncated at 2 std whose std is sqrt(2 / fan_in)), the depthwise primary convolution and the
routing weights as there (glorot_uniform, he_normal), zero biases. BatchNorm takes Keras's eps
(1e-3) but keeps torch's momentum 0.1 (Keras 0.9) instead of Keras's 0.99: at the few epochs of
our benchmarks, 0.99 leaves the running statistics far from the data's (after 156 steps 20 % of
them is still the initial 0 / 1), and evaluation collapses (2 epochs on 10,000 images, seeds 0/1:
80.2 / 87.8 % upright with 0.99 against 96.8 / 97.3 % with 0.1, the same init).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ClassifierModel, ModelOutput
from .capsnet import capsule_loss, masked_reconstruction, reconstruction_decoder
from .configs import EffCapsConfig, config_choices


def efficient_squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """v = (1 - exp(-|s|)) s / |s|; eps keeps the value and gradient finite at s = 0."""
    norm = torch.sqrt((s * s).sum(dim=dim, keepdim=True) + eps)
    return (1 - torch.exp(-norm)) * s / norm


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm with one channel per group has BatchNorm's 2 x channels parameters, so the
    # parameter count is the same either way.
    # Keras's eps; torch's momentum (see the module docstring for why not Keras's 0.99).
    return (nn.BatchNorm2d(channels, momentum=0.1, eps=1e-3) if kind == "batch"
            else nn.GroupNorm(channels, channels, eps=1e-3))


def _keras_init(module: nn.Module) -> None:
    """he_normal (truncated at 2 std) for the dense convolutions, glorot_uniform for the depthwise one."""
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            # Keras widens the untruncated std by 1/0.8796 so the truncated draw has std sqrt(2 / fan_in).
            std = math.sqrt(2.0 / (module.in_channels * module.kernel_size[0] * module.kernel_size[1])) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class SelfAttentionRouting(nn.Module):
    """Fully connected capsules, routed by self-attention (Sec. 3.3 of the paper).

    u_hat[n, l] = W[n, l] u[l]                                   prediction of input l for class n
    A[n]        = u_hat[n] u_hat[n]^T / sqrt(D)                  (L x L) agreement between inputs
    c[n, l]     = softmax_n( sum_k A[n, l, k] )                  how much input l backs class n
    s[n]        = sum_l u_hat[n, l] (c[n, l] + b[n, l]);  v[n] = squash(s[n])
    """

    def __init__(self, num_inputs: int, input_dim: int, num_classes: int, output_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, num_inputs, input_dim, output_dim))
        # The paper's he_normal with Keras's fan-in for a 4-D weight (all but the last dim: N * L * Din).
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (num_classes * num_inputs * input_dim)))
        self.log_prior = nn.Parameter(torch.zeros(num_classes, num_inputs))  # b, the routing prior
        self.scale = 1.0 / math.sqrt(output_dim)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, L, Din) primary capsules -> v (B, N, Dout) and coupling c (B, L, N)."""
        u_hat = torch.einsum("nlio,bli->bnlo", self.weight, u)  # (B, N, L, Dout)
        # sum_k A[n, l, k] = u_hat[n, l] . sum_k u_hat[n, k]: no need to form the L x L matrix.
        agreement = (u_hat * u_hat.sum(dim=2, keepdim=True)).sum(dim=-1) * self.scale  # (B, N, L)
        coupling = agreement.softmax(dim=1)  # over the classes
        s = ((coupling + self.log_prior).unsqueeze(-1) * u_hat).sum(dim=2)  # (B, N, Dout)
        return efficient_squash(s), coupling.transpose(1, 2)


class EfficientCapsNet(ClassifierModel):
    name = "effcaps"

    def __init__(self, config: EffCapsConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or EffCapsConfig()
        choices = config_choices(self.name, "norm")
        if c.norm not in choices:
            raise ValueError(f"norm must be one of {', '.join(choices)}, not {c.norm!r}")
        w = c.width
        primary_channels = 4 * w
        if primary_channels % c.primary_dim:
            raise ValueError(f"4 x width ({primary_channels}) must be a multiple of primary_dim ({c.primary_dim})")
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 5), nn.ReLU(inplace=True), _norm(c.norm, w),  # 28 -> 24
            nn.Conv2d(w, 2 * w, 3), nn.ReLU(inplace=True), _norm(c.norm, 2 * w),  # -> 22
            nn.Conv2d(2 * w, 2 * w, 3), nn.ReLU(inplace=True), _norm(c.norm, 2 * w),  # -> 20
            nn.Conv2d(2 * w, primary_channels, 3, stride=2), nn.ReLU(inplace=True),
            _norm(c.norm, primary_channels),  # -> 9
        )
        # Depthwise 9x9 over the 9x9 map: one 1x1 output per channel (the "depthwise-separable" primary caps).
        self.primary = nn.Conv2d(primary_channels, primary_channels, 9, groups=primary_channels)
        self.num_primary = primary_channels // c.primary_dim
        self.routing = SelfAttentionRouting(self.num_primary, c.primary_dim, c.num_classes, c.digit_dim)
        self.decoder = reconstruction_decoder(c.num_classes * c.digit_dim, c.decoder_hidden) if c.decoder else None
        self.features.apply(_keras_init)
        self.primary.apply(_keras_init)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                return_coupling: bool = False) -> ModelOutput:
        c = self.config
        x = self.primary(self.features(images))  # (B, 4w, 1, 1)
        u = efficient_squash(x.view(x.shape[0], self.num_primary, c.primary_dim))  # (B, 16, 8)
        v, coupling = self.routing(u)  # (B, 10, 16), (B, 16, 10)
        lengths = v.norm(dim=-1)  # (B, 10)
        reconstructions = masked_reconstruction(self.decoder, v, lengths, labels, self.training)  # (B, 1, 28, 28)
        return ModelOutput(scores=lengths, capsules=v, reconstructions=reconstructions,
                           coupling=coupling if return_coupling else None)

    def loss(self, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return capsule_loss(output, images, labels, self.config)
