"""A rotation-equivariant steerable CNN on e2cnn (Weiler & Cesa, "General E(2)-Equivariant Steerable
CNNs", NeurIPS 2019): feature fields of the regular representation of C_N (N = 8 by default).

lift: 5x5 conv from the grey image (trivial field) to w regular fields, 28x28
-> 3x3 conv 2w, avg-pool 2 (14x14) -> 3x3 conv 3w, 3x3 conv 3w, avg-pool 2 (7x7) -> 3x3 conv 4w
-> group pooling (max over the N rotations of each field: rotation-invariant features)
-> global average pool -> MLP (4w -> hidden -> 10 logits).

Every layer commutes with rotations by 360/N degrees up to interpolation of the filters; for
multiples of 90 degrees the filter grid maps onto itself, so the logits are exactly invariant
(to float rounding) when each layer keeps the image centre fixed: odd kernels with "same"
padding, 2x2 pooling on even sizes (28 -> 14 -> 7), no strided convolutions.

e2cnn quirks handled here: its basis modules are cached per process and shared by every layer
and model built with the same basis, so each layer samples its own (``recompute``). Also, R2Conv caches its expanded filter as a buffer in eval mode and drops
it in training mode, so state_dict keys would depend on the mode (and a checkpoint written in
one mode would not load in the other). ``_R2Conv`` keeps that cache out of the state dict (the
trained weights alone define the model), and a load in eval mode re-expands the filter from the
loaded weights. The sampled filter basis stays in the state dict as e2cnn registers it (constant,
~130 k numbers at the default width): a checkpoint then also records the basis it was trained with.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from e2cnn import gspaces
from e2cnn import nn as enn
from torch import nn

from .base import ClassifierModel, ModelOutput
from .configs import C8CNNConfig

_CACHED = ("filter", "expanded_bias")


class _R2Conv(enn.R2Conv):
    """R2Conv whose eval-mode filter cache is not part of the state dict."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # e2cnn registers a zero-filled cache at construction although the module starts in
        # training mode; drop it, so a fresh model (and DDP's buffer list) has none.
        for name in _CACHED:
            self._buffers.pop(name, None)

    def _forget_cache(self) -> None:
        for name in _CACHED:
            if name in self._buffers:
                self._non_persistent_buffers_set.add(name)

    def train(self, mode: bool = True) -> _R2Conv:
        super().train(mode)  # eval: expands and registers the cache (as persistent buffers)
        self._forget_cache()
        return self


def _conv(in_type: enn.FieldType, out_type: enn.FieldType, kernel: int) -> enn.R2Conv:
    # recompute: e2cnn otherwise hands every model in the process the same cached basis modules,
    # so moving one model to a GPU (or loading a checkpoint into it) also changes every other.
    return _R2Conv(in_type, out_type, kernel_size=kernel, padding=kernel // 2, recompute=True)


class C8CNN(ClassifierModel):
    name = "c8cnn"

    def __init__(self, config: C8CNNConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or C8CNNConfig()
        if c.rotations < 1:
            raise ValueError(f"rotations must be at least 1, not {c.rotations}")
        space = gspaces.Rot2dOnR2(N=c.rotations)
        self.input_type = enn.FieldType(space, [space.trivial_repr])

        def regular(fields: int) -> enn.FieldType:
            return enn.FieldType(space, fields * [space.regular_repr])

        w = c.width
        t1, t2, t3, t4 = regular(w), regular(2 * w), regular(3 * w), regular(4 * w)
        with warnings.catch_warnings():  # e2cnn 0.2.3 indexes with uint8 masks while sampling its basis
            warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8", category=UserWarning)
            self.features = self._build_features(t1, t2, t3, t4)
        self.classifier = nn.Sequential(nn.Linear(4 * w, c.hidden), nn.ReLU(inplace=True),
                                        nn.Linear(c.hidden, c.num_classes))
        self.register_load_state_dict_post_hook(_refresh_filter_cache)

    def _build_features(self, t1: enn.FieldType, t2: enn.FieldType, t3: enn.FieldType,
                        t4: enn.FieldType) -> enn.SequentialModule:
        return enn.SequentialModule(
            _conv(self.input_type, t1, 5), enn.ReLU(t1, inplace=True),  # (B, N*w, 28, 28)
            _conv(t1, t2, 3), enn.ReLU(t2, inplace=True),
            enn.PointwiseAvgPool(t2, 2),  # (B, N*2w, 14, 14)
            _conv(t2, t3, 3), enn.ReLU(t3, inplace=True),
            _conv(t3, t3, 3), enn.ReLU(t3, inplace=True),
            enn.PointwiseAvgPool(t3, 2),  # (B, N*3w, 7, 7)
            _conv(t3, t4, 3), enn.ReLU(t4, inplace=True),  # (B, N*4w, 7, 7)
            enn.GroupPooling(t4),  # (B, 4w, 7, 7): max over each field's N rotations, invariant
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        x = enn.GeometricTensor((images - 0.5) / 0.5, self.input_type)  # (B, 1, 28, 28)
        x = self.features(x).tensor  # (B, 4w, 7, 7) rotation-invariant fields
        x = x.mean(dim=(2, 3))  # (B, 4w): global average pool keeps the invariance to 90-degree turns
        return ModelOutput(scores=self.classifier(x))  # (B, 10) logits

    def loss(self, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.scores.float(), labels)


def _refresh_filter_cache(module: nn.Module, incompatible_keys: object) -> None:
    """After load_state_dict in eval mode, rebuild the cached filters from the loaded weights."""
    if not module.training:
        module.train()
        module.eval()


@functools.cache
def _weights_per_field_pair(rotations: int) -> tuple[int, int]:
    """Learned weights between one input and one output field: of the 5x5 lifting convolution
    (trivial -> regular) and of a 3x3 regular -> regular one. Every pair of fields of the same
    kinds shares the same steerable basis, so a layer's count is this times in x out fields."""
    space = gspaces.Rot2dOnR2(N=rotations)

    def field(repr_: object) -> enn.FieldType:
        return enn.FieldType(space, [repr_])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8", category=UserWarning)
        lift = enn.R2Conv(field(space.trivial_repr), field(space.regular_repr), 5, bias=False)
        conv = enn.R2Conv(field(space.regular_repr), field(space.regular_repr), 3, bias=False)
    return lift.weights.numel(), conv.weights.numel()


def parameter_count(c: C8CNNConfig) -> int:
    """The parameters of ``C8CNN(c)``, without building it (building a wide one takes minutes:
    e2cnn samples every layer's basis). One bias per regular output field."""
    lift, conv = _weights_per_field_pair(c.rotations)
    w = c.width
    field_pairs = w * 2 * w + 2 * w * 3 * w + 3 * w * 3 * w + 3 * w * 4 * w
    biases = w + 2 * w + 3 * w + 3 * w + 4 * w
    classifier = 4 * w * c.hidden + c.hidden + c.hidden * c.num_classes + c.num_classes
    return lift * w + conv * field_pairs + biases + classifier
