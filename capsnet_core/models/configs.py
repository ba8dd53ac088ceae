"""Model configs: plain dataclasses, importable without torch.

They live apart from the models so the service can validate a job spec (model name, config
overrides) without paying torch's import time in every ``capsctl`` command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class LeNet5Config:
    num_classes: int = 10
    conv1_channels: int = 6
    conv2_channels: int = 16
    hidden1: int = 120
    hidden2: int = 84


@dataclass
class CapsNetConfig:
    num_classes: int = 10
    conv_channels: int = 256  # conv1 width
    primary_maps: int = 32  # number of primary capsule maps (each 6x6 capsules)
    primary_dim: int = 8
    digit_dim: int = 16
    routing_iters: int = 3
    decoder: bool = True
    decoder_hidden: tuple[int, int] = (512, 1024)
    # Margin loss (eq. 4 of the paper) and reconstruction weight.
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_absent: float = 0.5
    reconstruction_weight: float = 0.0005
    # Std of the initial capsule transforms W_ij. With the paper's softmax over parents, the
    # 1,152 predictions are summed per parent; unit-variance transforms make every |s_j| huge,
    # squash saturates at length ~1 for all classes and the margin loss gradient vanishes
    # (training stalls near 10 %). 0.01 keeps |s_j| ~ 1 at the start, where squash is steep.
    transform_init_std: float = 0.01
    # NHWC convolutions for the direct path: better on CUDA tensor cores. (On CPU the FFT path
    # does not use it, and with primary_conv="direct" it measured the same as NCHW, ~100 img/s.)
    channels_last: bool = True
    # Primary-capsule convolution: "fft" (small DFTs + per-frequency matmuls, ~5x fewer FLOPs,
    # the faster one on CPU), "direct" (F.conv2d: cuDNN + bf16 autocast win on CUDA), or "auto"
    # (fft on CPU, direct elsewhere). Same maths either way, equal up to float rounding.
    primary_conv: str = "auto"

    @property
    def reconstructs(self) -> bool:
        """Whether the trained model draws reconstructions (its decoder is on); configs without
        this property do not, and the train run plots none for them."""
        return self.decoder


@dataclass
class EffCapsConfig:
    """Efficient-CapsNet's MNIST network (Mazzia, Salvetti & Chiaberge 2021); defaults are the paper's."""

    num_classes: int = 10
    width: int = 32  # conv1 channels; conv2/conv3 get 2x, conv4 (= primary capsule channels) 4x
    primary_dim: int = 8  # the 4*width depthwise outputs are grouped into 4*width/primary_dim capsules
    digit_dim: int = 16
    # "batch" as in the paper; "group" (GroupNorm, same parameters) keeps DDP ranks' statistics
    # out of the model: BatchNorm under DDP normalises with each rank's own shard.
    norm: str = "batch"
    decoder: bool = False  # the paper's reconstruction regulariser (160 -> 512 -> 1024 -> 784); not in its 161 k
    decoder_hidden: tuple[int, int] = (512, 1024)
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_absent: float = 0.5
    reconstruction_weight: float = 0.0005  # the paper's 0.392 x mean squared error = 0.392 / 784 x sum


@dataclass
class ResNetConfig:
    """A small pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks")."""

    num_classes: int = 10
    width: int = 32  # channels of the first stage; each later stage doubles them and halves the size
    blocks_per_stage: int = 1  # basic blocks per stage (3 stages: 28x28, 14x14, 7x7)
    groups: int = 8  # GroupNorm groups (GroupNorm, not BatchNorm: no running statistics to sync under DDP)


@dataclass
class C8CNNConfig:
    """A C_N-equivariant steerable CNN on e2cnn (Weiler & Cesa 2019), regular representations."""

    num_classes: int = 10
    rotations: int = 8  # N of the cyclic group C_N; any multiple of 4 keeps exact 90-degree invariance
    width: int = 8  # regular fields (each N channels) of the first layer; later layers 2x, 3x, 4x
    hidden: int = 64  # the classifier's hidden layer



def capsnet_size(c: CapsNetConfig) -> tuple[int, int]:
    """(parameters, activation floats per sample of one forward) of a CapsNet, from its config."""
    channels = c.primary_maps * c.primary_dim
    primary = c.primary_maps * 36
    params = (c.conv_channels * 81 + c.conv_channels  # conv1, 9x9 from 1 channel
              + channels * c.conv_channels * 81 + channels  # primary capsules, 9x9
              + primary * c.num_classes * c.digit_dim * c.primary_dim)  # W_ij
    activations = (c.conv_channels * 400 + channels * 36  # conv1 (20x20), primary (6x6)
                   + primary * c.num_classes * c.digit_dim  # u_hat
                   + c.routing_iters * primary * c.num_classes * 2)  # logits and coupling per iteration
    if c.decoder:
        h1, h2 = c.decoder_hidden
        params += c.num_classes * c.digit_dim * h1 + h1 + h1 * h2 + h2 + h2 * 784 + 784
        activations += h1 + h2 + 784
    return params, activations


def lenet5_size(c: LeNet5Config) -> tuple[int, int]:
    """(parameters, activation floats per sample of one forward) of a LeNet5, from its config."""
    params = (c.conv1_channels * 25 + c.conv1_channels + c.conv1_channels * c.conv2_channels * 25
              + c.conv2_channels + c.conv2_channels * 16 * c.hidden1 + c.hidden1 + c.hidden1 * c.hidden2
              + c.hidden2 + c.hidden2 * c.num_classes + c.num_classes)
    activations = (c.conv1_channels * (576 + 144) + c.conv2_channels * (64 + 16) + c.hidden1 + c.hidden2
                   + c.num_classes)
    return params, activations


# Size formulas, {model: f(config) -> (parameters, activation floats per sample)}: what a job
# would allocate, known at submit without torch. Models without one are measured by building
# them on the meta device (``capsnet_core.models.estimate_model_size``).
def c8cnn_size(c: C8CNNConfig) -> tuple[int, None]:
    """Parameters of a C8CNN by formula: e2cnn samples its filter basis with real tensors, so it
    cannot be built on the meta device, and building a wide one takes minutes."""
    from .c8cnn import parameter_count  # needs e2cnn: imported only when asked

    return parameter_count(c), None


SIZE_ESTIMATORS: dict[str, Any] = {"capsnet": capsnet_size, "lenet5": lenet5_size, "c8cnn": c8cnn_size}

# The allowed values of text fields, {model: {field: choices}}: job specs are checked against
# these at submit, and the models check them again when built.
CONFIG_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {"capsnet": {"primary_conv": ("auto", "direct", "fft")},
                                                          "effcaps": {"norm": ("batch", "group")}}

# Upper bounds of integer fields beyond the generic 1..65536 of job specs, {model: {field: max}}:
# routing cost grows linearly with the iterations, and the paper's gain stops at 3.
# C_N beyond 32 rotations buys nothing on a 28x28 grid and its basis takes long to sample.
CONFIG_MAXIMA: dict[str, dict[str, int]] = {"capsnet": {"routing_iters": 10}, "c8cnn": {"rotations": 32}}

MODEL_CONFIGS: dict[str, type] = {"capsnet": CapsNetConfig, "lenet5": LeNet5Config, "effcaps": EffCapsConfig,
                                  "resnet": ResNetConfig, "c8cnn": C8CNNConfig}
# One line per model for ``capsctl models`` (kept here: the CLI lists them without importing torch).
MODEL_DESCRIPTIONS: dict[str, str] = {
    "capsnet": "Dynamic-routing CapsNet (Sabour, Frosst & Hinton 2017) with its reconstruction decoder",
    "c8cnn": "C8-equivariant steerable CNN (e2cnn, regular fields), rotation-invariant pooling",
    "effcaps": "Efficient-CapsNet (Mazzia et al. 2021): depthwise primary capsules, self-attention routing",
    "lenet5": "LeNet5 as in the tutorial: two 5x5 convolutions, average pooling, three FC layers",
    "resnet": "Pre-activation ResNet, 3 stages (28, 14, 7 px) with GroupNorm: a strong plain-CNN baseline",
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(MODEL_CONFIGS))


def config_class(name: str) -> type:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def config_choices(name: str, field: str) -> tuple[str, ...] | None:
    """The values a text config field allows, or None when it is not a choice."""
    return CONFIG_CHOICES.get(name, {}).get(field)


def config_maximum(name: str, field: str) -> int | None:
    """The largest value an integer config field allows, or None for the generic bound."""
    return CONFIG_MAXIMA.get(name, {}).get(field)


def model_config_fields(name: str) -> dict[str, Any]:
    """The config fields of a model and their defaults (for validation in job specs)."""
    config_cls = config_class(name)
    return {f.name: getattr(config_cls(), f.name) for f in dataclasses.fields(config_cls)}
