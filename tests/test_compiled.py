"""The compiled training step's fallback: a compiler that fails costs a warning, never the run."""

from __future__ import annotations

import logging

import pytest
import torch

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.compiled import CompiledOrEager, maybe_compile
from capsnet_core.models import unwrap
from capsnet_core.presets import parse_preset
from capsnet_core.train import train_one_epoch


def failing_backend(graph_module, example_inputs):  # noqa: ANN001 - torch.compile's backend signature
    raise RuntimeError("CUDA graph capture failed: operation not permitted when stream is capturing")


def test_a_failing_compile_falls_back_to_eager_once_and_trains_the_same(data_dir, caplog) -> None:
    train = load_dataset("mnist", "train", root=data_dir).subset(512)
    torch.manual_seed(0)
    eager = build_model("lenet5")
    fit(eager, train, None, TrainConfig(epochs=1, batch_size=64))

    torch.manual_seed(0)
    model = build_model("lenet5")
    wrapped = CompiledOrEager(model, "default", backend=failing_backend)
    assert unwrap(wrapped) is model and len(list(wrapped.parameters())) == len(list(model.parameters()))
    with caplog.at_level(logging.WARNING, logger="capsnet_core.compiled"):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # as fit() builds it
        train_one_epoch(wrapped, optimizer, train, batch_size=64, augment=parse_preset("shift2"), epoch=0)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA graph capture failed" in wrapped.fallback_reason
    for a, b in zip(eager.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same steps as eager mode, bit for bit


def test_compile_modes_are_checked_and_none_is_the_model_itself() -> None:
    model = build_model("lenet5")
    assert maybe_compile(model, "none") is model
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead, max-autotune"):
        CompiledOrEager(model, "fast")
