"""Small job specs shared by the queue tests: a tiny CapsNet train job and a worker's capacity."""

from __future__ import annotations

from typing import Any

TINY = {"conv_channels": 16, "primary_maps": 4}  # a CapsNet small enough to build in milliseconds
CPU = {"gpus": 0, "cpus": 8}  # what a claiming worker offers: room for any CPU job of the tests


def train(**kw: Any) -> dict[str, Any]:
    return {"kind": "train", "model": "capsnet", "epochs": 1, "model_config": TINY,
            "train_subset": 64, "test_subset": 64, **kw}
