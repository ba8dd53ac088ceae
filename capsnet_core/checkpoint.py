"""Checkpoints: model, optimizer, scheduler, epoch, RNG state, configs and history in one file.

Writes are atomic (temporary file, fsync, rename), so a crash mid-write leaves the previous
checkpoint intact. That holds for this file only: a copy made afterwards (Ray Train's upload to
storage) is checked by the service against the size and SHA-256 recorded at write time.

Loading never runs code from the file: ``torch.load(weights_only=True)`` unpickles only
tensors and plain containers (our files need nothing else), so a crafted pickle handed to
``capsctl eval`` is refused with ``CheckpointRejected`` instead of executing.
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


class CheckpointRejected(ValueError):
    """A file that is not a capsnet_core checkpoint, or needs more than tensors and plain
    containers to load. The message is one line naming the file; retrying cannot help."""


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
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut never leaves an empty file named as done
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; weights and optimizer state end up on `map_location`.

    Everything is read on the CPU first: the RNG states must stay there whatever the map
    location (``torch.set_rng_state`` only takes a CPU ByteTensor, so mapping them to
    ``cuda:N`` made every resume on a GPU crash).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError/EOFError for junk
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointRejected(f"{path}: refused, not a safe capsnet_core checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or "model" not in payload:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointRejected(f"{path}: refused, not a capsnet_core checkpoint (format {found!r})")
    if torch.device(map_location).type != "cpu":
        for key in ("model_state", "optimizer_state"):
            payload[key] = _to_device(payload.get(key), torch.device(map_location))
    return payload


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def resume_training(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: str | torch.device) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG state from a checkpoint onto `device` (the
    code path of every rank, CPU or GPU); returns the payload (epoch, history...)."""
    state = load_checkpoint(path, map_location=device)
    unwrap(model).load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    if scheduler is not None and state.get("scheduler_state") is not None:
        scheduler.load_state_dict(state["scheduler_state"])
    set_rng_state(state["rng_state"])
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint and load its weights."""
    return model_from_checkpoint(load_checkpoint(path, map_location=device), device)


def model_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The model of an already loaded checkpoint, in eval mode on `device`."""
    spec = payload["model"]
    model = build_model(spec["name"], **spec["config"])
    model.load_state_dict(payload["model_state"])
    return model.to(device).eval()
