"""Training: ``train_one_epoch`` over a device-resident dataset and ``fit`` (epochs, eval, checkpoints).

The whole split lives on the training device as one uint8 tensor; each step gathers a batch
by index and augments it there, so there is no DataLoader, no worker processes and no
host-to-device copy per step.

Data-parallel training: every rank draws the same permutation (seeded by seed and epoch)
and takes its own disjoint shard of it, with ``batch_size // world_size`` images per step,
so the global batch and the learning rate are what the user asked for whatever the number
of ranks.  Wrap the model in DistributedDataParallel before calling; this module itself
never talks to a process group.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .augment import AugmentSpec, augment_batch, parse_preset
from .checkpoint import resume_training, save_checkpoint
from .compiled import maybe_compile
from .data import Dataset
from .evaluate import autocast_context, configure_backends, cpu_threads, evaluate, evaluate_suites
from .models.base import unwrap
from .suites import angle_key

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingStopped(Exception):
    """Raised inside training when ``should_stop()`` turned true (cancel, lost lease)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global batch size over all ranks
    lr: float = 1e-3
    lr_decay: float = 1.0  # ExponentialLR gamma, applied after every epoch
    augment: str = "shift2"  # training augmentation preset (see capsnet_core.augment)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    eval_angles: tuple[float, ...] = (0.0, 15.0, 35.0)  # final robustness evaluation
    eval_suites: tuple[str, ...] = ()  # named test suites (capsnet_core.suites), after eval_angles
    eval_every: int = 1  # upright validation accuracy after every n epochs (0 = never)
    eval_batch_size: int = 500
    log_every: int = 20  # a step event every n steps
    eval_threads: int = 0  # torch CPU threads while rank 0 evaluates (others wait idle); 0 = as training
    # A compute budget: stop after this many optimizer steps in all (the last epoch is then
    # partial), for equal-compute comparisons; None = train all `epochs`.
    max_steps: int | None = None
    # torch.compile the training forward ("reduce-overhead" = CUDA graphs; capsnet_core.compiled):
    # "none" (default, and what the CPU wants), "default", "reduce-overhead", "max-autotune".
    compile: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    history: list[dict[str, Any]]  # one entry per epoch, including epochs before a resume
    rotation_accuracy: dict[str, float]  # {"35": 0.76, ...} keyed by angle as text (JSON-safe)
    per_class: dict[str, list[float]]  # per-class accuracy at each evaluation angle
    start_epoch: int  # epochs already done when this call began (resume)
    epochs: int
    train_seconds: float
    suite_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)  # {"rotation_auc": .6, ...}
    # [true][predicted] test-image counts at each evaluation angle
    confusion: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ddp_options(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for wrapping `model` in DistributedDataParallel.

    Buffers are broadcast from rank 0 before every forward only when the model has state in
    them (BatchNorm running statistics: persistent buffers, in the state dict). Constant
    buffers, such as CapsNet's DFT matrices (24,272 floats, unused on CUDA), are identical on
    every rank by construction: broadcasting them each step is pure NCCL traffic.
    """
    stateful = set(unwrap(model).state_dict())
    return {"broadcast_buffers": any(name in stateful for name, _ in unwrap(model).named_buffers())}


def _generator(device: torch.device, *seeds: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    value = 0
    for s in seeds:  # a simple deterministic mix of (seed, epoch, rank)
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    generator.manual_seed(value)
    return generator


def shard_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's indices for one epoch: a disjoint 1/world_size slice of a shared permutation."""
    permutation = torch.randperm(n, generator=_generator(torch.device("cpu"), seed, epoch))
    per_rank = n // world_size  # equal shard sizes keep every rank at the same number of steps
    return permutation[rank * per_rank:(rank + 1) * per_rank]


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, *, batch_size: int,
                    augment: AugmentSpec, epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                    amp: bool = True, log_every: int = 20, on_progress: ProgressCallback | None = None,
                    should_stop: Callable[[], bool] | None = None, max_steps: int | None = None) -> dict[str, float]:
    """One pass over this rank's shard (its first ``max_steps`` batches, if given). data must
    already be on the model's device."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by {world_size} ranks")
    bare = unwrap(model)
    device = next(bare.parameters()).device
    local_batch = batch_size // world_size
    indices = shard_indices(len(data), epoch, seed, rank, world_size).to(device)
    generator = _generator(device, seed, epoch, rank, 1)
    steps = (indices.numel() + local_batch - 1) // local_batch
    if max_steps is not None:
        steps = max(0, min(steps, max_steps))
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    start = window_start = time.perf_counter()
    window_seen = 0
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at epoch {epoch + 1}, step {step}")
        batch = indices[step * local_batch:(step + 1) * local_batch]
        labels = data.labels[batch]
        images = augment_batch(data.images[batch], augment, generator)  # (b, 1, 28, 28) float
        with autocast_context(device, amp):
            output = model(images, labels)
            loss = bare.loss(output, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (output.scores.detach().argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
        window_seen += labels.shape[0]
        if on_progress is not None and rank == 0 and ((step + 1) % log_every == 0 or step + 1 == steps):
            now = time.perf_counter()  # .item() below synchronises, so the window timing is honest
            on_progress({
                "type": "step", "epoch": epoch + 1, "step": step + 1, "steps_per_epoch": steps,
                "loss": float(loss.item()), "accuracy": float(correct.item() / seen),
                "images_per_second": window_seen * world_size / max(now - window_start, 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
            })
            window_start, window_seen = now, 0
    total_loss, total_correct = float(loss_sum.item()), float(correct.item())
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "accuracy": total_correct / max(seen, 1), "images": seen,
            "steps": steps, "seconds": seconds, "images_per_second": seen * world_size / max(seconds, 1e-9)}


def _gpu_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


@dataclass
class _TestFigures:
    """The figures reported at the end: accuracy per angle (and per class), confusions, suites."""
    rotation: dict[str, float] = dataclasses.field(default_factory=dict)
    per_class: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    confusion: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    suites: dict[str, float] = dataclasses.field(default_factory=dict)


def _evaluate_test_set(model: nn.Module, test: Dataset, config: TrainConfig, device: torch.device,
                       emit: ProgressCallback | None) -> _TestFigures:
    figures = _TestFigures()
    with cpu_threads(config.eval_threads, device):
        for angle in config.eval_angles:
            result = evaluate(model, test.images, test.labels, batch_size=config.eval_batch_size,
                              angle=angle, amp=config.amp)
            key = angle_key(angle)
            figures.rotation[key], figures.per_class[key], figures.confusion[key] = (
                result.accuracy, result.per_class, result.confusion)
        figures.suites.update(evaluate_suites(model, test, config.eval_suites, figures.rotation,
                                              config.eval_batch_size, config.amp))
        if emit is not None:
            emit({"type": "eval", "test_accuracy": dict(figures.rotation),
                  **({"suite_accuracy": dict(figures.suites)} if figures.suites else {})})
    return figures


def _epoch_record(epoch: int, stats: dict[str, Any], lr: float, world_size: int) -> dict[str, Any]:
    return {"epoch": epoch + 1, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "lr": lr,
            "epoch_seconds": stats["seconds"], "steps": stats["steps"], "images": stats["images"] * world_size,
            "images_per_second": stats["images_per_second"]}


def fit(model: nn.Module, train: Dataset, test: Dataset | None, config: TrainConfig, *,
        val: Dataset | None = None, rank: int = 0, world_size: int = 1, checkpoint_path: str | Path | None = None,
        resume_from: str | Path | None = None, on_progress: ProgressCallback | None = None,
        on_checkpoint: Callable[[Path, int], None] | None = None,
        on_epoch_end: Callable[[list[dict[str, Any]], Path | None], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> FitResult:
    """Train for config.epochs epochs (continuing from `resume_from` if given), then evaluate.

    Only rank 0 evaluates, writes `checkpoint_path` after every epoch, calls `on_checkpoint`
    and `on_progress`.  Per epoch it measures the validation split `val` (``val_accuracy``,
    ``val_loss``), never the test set: `test` is evaluated once, after the last epoch, for the
    reported figures only (empty on other ranks).  `on_epoch_end(history, checkpoint)` runs on
    every rank after every epoch (checkpoint is None except on rank 0), for frameworks whose
    reporting is a collective barrier.
    """
    bare = unwrap(model)
    device = next(bare.parameters()).device
    configure_backends(device)
    augment = parse_preset(config.augment)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume_from is not None and Path(resume_from).is_file():
        state = resume_training(resume_from, model, optimizer, scheduler, device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
    train = train.to(device)
    test = test.to(device) if test is not None and rank == 0 else None
    val = val.to(device) if val is not None and rank == 0 else None
    emit = on_progress if rank == 0 else None
    began = time.perf_counter()
    figures: _TestFigures | None = None
    steps_done = sum(int(h.get("steps", 0)) for h in history)

    stepped = maybe_compile(model, config.compile)  # evaluation stays eager: one pass, no warm-up to pay back
    for epoch in range(start_epoch, config.epochs):
        steps_left = None if config.max_steps is None else config.max_steps - steps_done
        if steps_left is not None and steps_left <= 0:
            break  # the compute budget was spent before this epoch (a resume)
        stats = train_one_epoch(stepped, optimizer, train, batch_size=config.batch_size, augment=augment,
                                epoch=epoch, seed=config.seed, rank=rank, world_size=world_size,
                                amp=config.amp, log_every=config.log_every, on_progress=emit,
                                should_stop=should_stop, max_steps=steps_left)
        steps_done += stats["steps"]
        record = _epoch_record(epoch, stats, optimizer.param_groups[0]["lr"], world_size)
        scheduler.step()
        last = epoch + 1 == config.epochs or (config.max_steps is not None and steps_done >= config.max_steps)
        if val is not None and config.eval_every and ((epoch + 1) % config.eval_every == 0 or last):
            with cpu_threads(config.eval_threads, device):
                upright = evaluate(model, val.images, val.labels, batch_size=config.eval_batch_size, amp=config.amp)
            record.update(val_accuracy=upright.accuracy, val_loss=upright.loss)
        if last and test is not None:
            # The robustness evaluation belongs to the final checkpoint: do it before saving, so
            # the last checkpoint (and its report) carries the result.
            figures = _evaluate_test_set(model, test, config, device, emit)
            record.update(rotation_accuracy=dict(figures.rotation), per_class=dict(figures.per_class),
                          confusion=dict(figures.confusion))
            if figures.suites:
                record.update(suite_accuracy=dict(figures.suites))
        history.append(record)
        saved: Path | None = None
        if rank == 0 and checkpoint_path is not None:
            saved = save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch=epoch + 1,
                                    train_config=config.to_dict(), history=history)
            if on_checkpoint is not None:
                on_checkpoint(saved, epoch + 1)
        if emit is not None:
            emit({"type": "epoch", **{k: v for k, v in record.items() if k not in ("per_class", "confusion")},
                  "epochs": config.epochs, "gpu_memory_bytes": _gpu_memory(device)})
        if on_epoch_end is not None:
            on_epoch_end(history, saved)
        if last:
            break
    train_seconds = time.perf_counter() - began
    if figures is None and test is not None:
        # nothing left to train (resumed after the last epoch): still evaluate
        figures = _evaluate_test_set(model, test, config, device, emit)
    figures = figures or _TestFigures()
    return FitResult(history=history, rotation_accuracy=figures.rotation, per_class=figures.per_class,
                     start_epoch=start_epoch, epochs=config.epochs, train_seconds=train_seconds,
                     suite_accuracy=figures.suites, confusion=figures.confusion)
