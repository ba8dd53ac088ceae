"""Checkpoints: model, optimizer, scheduler, epoch, RNG state, configs and history in one file.

Writes are atomic (temporary file + rename), so a crash mid-write leaves the previous
checkpoint intact: a resumed job never reads half a file.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import build_model
from .models.base import unwrap

FORMAT_VERSION = 1


def model_spec(model: nn.Module) -> dict[str, Any]:
    """Name and config of a registered model, enough to rebuild it."""
    bare = unwrap(model)
    return {"name": bare.name, "config": dataclasses.asdict(bare.config)}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, epoch: int = 0, train_config: dict | None = None,
                    history: list | None = None, extra: dict | None = None) -> Path:
    """Save after `epoch` completed epochs; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "model": model_spec(model),
        "model_state": unwrap(model).state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "train_config": train_config or {},
        "history": history or [],
        "rng_state": rng_state(),
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: our own files carry RNG state (numpy/python objects), never user input.
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a capsnet_core checkpoint (format {payload.get('format')!r})")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint and load its weights."""
    return model_from_checkpoint(load_checkpoint(path, map_location=device), device)


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The model of an already loaded checkpoint, in eval mode on `device`."""
    spec = payload["model"]
    model = build_model(spec["name"], **spec["config"])
    model.load_state_dict(payload["model_state"])
    return model.to(device).eval()
