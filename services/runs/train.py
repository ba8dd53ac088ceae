"""Train jobs on Ray: one Ray Train ``TorchTrainer`` run (Train V2 API) per train job.

``num_workers`` = the job's ranks (``--gpus N``: N GPU workers with NCCL; ``--workers N``: N
CPU workers with gloo). Every rank loads the dataset itself, keeps it on its device and trains
on its own shard of a shared permutation (``capsnet_core.train``); DDP averages gradients.
Rank 0 evaluates, writes checkpoints, and publishes progress and log events to Redis.

Checkpoints go through ``ray.train.report`` into ``RunConfig(storage_path=<artifacts>,
name=<job id>)``: a local folder or any URI Ray accepts (``s3://``...). Because the run name
is the job id, a later attempt of the same job (after its worker died) resumes in that folder:
rank 0 records each checkpoint's size and SHA-256 in the job record, and ``choose_resume`` walks
back from the newest to the newest intact one (``services.runs.checkpoints``), which every rank loads
instead of starting at epoch 0. Ray's own ``get_checkpoint()`` is not used: it is not verified.

The job runtime (``JobContext``, ``JobChannel``, how a run ends) is ``runtime``; which failures
are infrastructure losses is ``losses``; eval jobs are ``evaluate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.checkpoint import load_checkpoint
from capsnet_core.evaluate import cpu_threads
from capsnet_core.models import model_reconstructs
from capsnet_core.train import shard_indices
from capsnet_core.validation import describe_split, split_training_pool
from services.artifacts import is_uri, join
from services.runs.checkpoints import (
    KEEP_CHECKPOINTS,
    RAY_SNAPSHOT_FILE,
    Skipped,
    entry_for,
    fetch_to,
    iter_warnings,
    parse_entries,
    quarantine,
    ray_snapshot_problem,
    resume_candidates,
    walk_back,
)
from services.runs.event_files import EventFiles, tensorboard_dir
from services.runs.losses import infrastructure_loss, node_loss
from services.runs.runtime import (
    CHECKPOINT_FILE,
    JobChannel,
    JobContext,
    check_job_limits,
    fit_or_stop,
    prepare_ddp_model,
)
from services.runs.tracking import (
    Tracker,
    TrackingTarget,
    epoch_metrics,
    result_metrics,
    spec_params,
    tracking_target,
)
from services.spec.jobspec import TrainSpec
from services.spec.results import JobResult


def _train_config(spec: TrainSpec, eval_threads: int = 0) -> TrainConfig:
    return TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, lr_decay=spec.lr_decay,
                       augment=spec.augment, seed=spec.seed, eval_angles=tuple(spec.eval_angles),
                       eval_suites=tuple(spec.eval_suites), eval_threads=eval_threads)


def _eval_threads(train_ctx: Any, device: torch.device) -> int:
    """CPU threads for rank 0's evaluation: those of every rank on its node, which wait idle
    meanwhile (a CapsNet evaluation on one thread took longer than its training epoch)."""
    if device.type != "cpu":
        return 0
    local_ranks = getattr(train_ctx, "get_local_world_size", lambda: 1)()
    return max(1, int(local_ranks)) * torch.get_num_threads()


def set_process_niceness(niceness: int) -> int:
    """Renice every thread of this process (on Linux the nice level is per thread, and gloo's and
    Ray's threads already exist); returns the rank's nice level afterwards.

    Ray starts its worker processes at nice 15 unless the node was started with
    ``config.RAY_NODE_ENV`` (a cluster capsctl did not start): lowering the level back needs
    CAP_SYS_NICE or RLIMIT_NICE, so without them the rank keeps Ray's level (and logs it).
    """
    for task in Path("/proc/self/task").glob("*") if sys.platform.startswith("linux") else []:
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
        except OSError:  # not permitted, or the thread has just exited
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def adopt_worker_niceness(worker_niceness: int) -> int:
    """Run this rank at the nice level of the capsctl worker that took the job, not at Ray's
    (15 by default): an operator who started the worker with ``nice -n 19`` meant its training
    too, and one who did not wants the ranks at normal priority. Returns the level reached."""
    if os.getpriority(os.PRIO_PROCESS, 0) == worker_niceness:
        return worker_niceness
    return set_process_niceness(worker_niceness)


def _announce_rank(channel: JobChannel, spec: TrainSpec, ctx: JobContext, train_size: int, rank: int,
                   world_size: int, device: torch.device, niceness: int) -> None:
    """One event per rank: where it runs, which shard it trains on, how long the hand-over took."""
    import ray

    # Which images this rank trains on in its first epoch: the test suite checks ranks differ.
    shard = shard_indices(train_size, epoch=0, seed=spec.seed, rank=rank, world_size=world_size)
    fingerprint = hashlib.sha1(shard.numpy().tobytes()).hexdigest()[:12]
    # Ready to train: how long the worker's hand-over took (Ray Train's processes, data, model).
    startup = round(time.time() - ctx.started_at, 3) if ctx.started_at else None
    node_id = ray.get_runtime_context().get_node_id()  # which Ray node to blame if this rank is lost
    channel.report_node(node_id)
    channel.log(f"rank {rank}/{world_size} on {device}, Ray node {node_id[:8]}: {shard.numel()} images per epoch, "
                f"shard {fingerprint}"
                + (f"; ready {startup:.1f} s after the worker took the job" if startup is not None else "")
                + (f"; running at nice {niceness}, not the worker's {ctx.niceness} (Ray's worker niceness; "
                   "could not lower it)" if niceness > ctx.niceness else ""),
                rank=rank, world_size=world_size, nice=niceness, torch_threads=torch.get_num_threads(),
                shard_size=int(shard.numel()), shard_fingerprint=fingerprint, device=str(device), node_id=node_id,
                **({"startup_seconds": startup} if rank == 0 and startup is not None else {}))


def _fetch_resume(resume_uri: str | None, workdir: Path) -> Path | None:
    """The checkpoint file to resume from, copied out of storage into this rank's workdir."""
    # The driver chose (and verified) it out of the job record; Ray's own ``get_checkpoint()`` is
    # ignored: it names the newest checkpoint whether intact or not.
    if not resume_uri:
        return None
    import ray.train

    ray.train.Checkpoint(resume_uri).to_directory(str(workdir / "resume"))
    resume_file = workdir / "resume.pt"
    (workdir / "resume" / CHECKPOINT_FILE).replace(resume_file)
    return resume_file


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every rank inside Ray Train."""
    import ray
    import ray.train
    import ray.train.torch

    spec = TrainSpec.model_validate(config["spec"])
    ctx = JobContext(**config["ctx"])
    train_ctx = ray.train.get_context()
    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    channel = JobChannel(ctx)
    device = ray.train.torch.get_device()
    niceness = adopt_worker_niceness(ctx.niceness)

    torch.manual_seed(spec.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(spec.model, **spec.model_kwargs())
    # Moves to this rank's device (CapsNet lays out its weights for it); DDP when world_size > 1.
    model = prepare_ddp_model(model)
    # Per-epoch accuracy is measured on a hold-out of the training set, never on the test set.
    train, val, _ = split_training_pool(load_dataset(spec.dataset, "train", root=ctx.data_dir), spec.val_split,
                                        spec.train_subset)
    test = load_dataset(spec.dataset, "test", root=ctx.data_dir).subset(spec.test_subset) if rank == 0 else None
    _announce_rank(channel, spec, ctx, len(train), rank, world_size, device, niceness)

    workdir = Path(tempfile.mkdtemp(prefix=f"capsctl-{ctx.job_id}-r{rank}-"))
    resume_file = _fetch_resume(config.get("resume"), workdir)

    # Rank 0 alone tells MLflow and TensorBoard, after each epoch's barrier (services.runs.tracking).
    tracker = (Tracker.start(TrackingTarget(**config["tracking"]), channel.warn, spec_params(spec.to_dict()))
               if rank == 0 and config.get("tracking") else None)
    tb_dir = tensorboard_dir(ctx.artifacts, ctx.job_id) if rank == 0 else None
    events = EventFiles(tb_dir, channel.warn) if tb_dir is not None else None

    def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
        # ray.train.report is a barrier on every rank; rank 0 hands over the checkpoint it just
        # wrote, and its metrics (with the whole history, small) become the run's result.
        epoch = history[-1]["epoch"]
        ray_checkpoint = ray.train.Checkpoint.from_directory(str(saved.parent)) if saved is not None else None
        metrics = {**history[-1], "history": history, "world_size": world_size, "device": str(device)}
        # Size and digest of the file as written, before Ray copies it to storage: a resume
        # checks the stored copy against them (services.runs.checkpoints).
        written = entry_for(saved, epoch, "") if rank == 0 and saved is not None else None
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if rank == 0:
            uri = join(ctx.artifacts, ctx.job_id, f"epoch-{epoch:04d}")
            entry = dataclasses.replace(written, uri=uri).to_dict() if written is not None else None
            channel.set_checkpoint(uri, entry)
            if tracker is not None:
                tracker.log_metrics(epoch_metrics(history[-1]), step=epoch)
            if events is not None:
                events.epoch(history[-1])

    finished = False
    try:
        eval_threads = _eval_threads(train_ctx, device)
        result = fit(model, train, test, _train_config(spec, eval_threads), val=val, rank=rank, world_size=world_size,
                     checkpoint_path=workdir / "epoch" / CHECKPOINT_FILE if rank == 0 else None,
                     resume_from=resume_file, on_progress=channel.progress if rank == 0 else None,
                     on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        _report_resume(result, spec, rank, world_size, device, resume_file, workdir, channel)
        if rank == 0 and test is not None:
            with cpu_threads(eval_threads, device):
                plots = _write_plots(model, test, result.rotation_accuracy, result.history, spec, ctx, channel,
                                     workdir / "plots" if tracker is not None else None)
            last_epoch = result.history[-1]["epoch"] if result.history else spec.epochs
            if events is not None:
                events.rotation(result.rotation_accuracy, last_epoch)
            if tracker is not None:
                _track_outcome(tracker, result, plots, workdir / "epoch" / CHECKPOINT_FILE, last_epoch)
        finished = True
    finally:
        if events is not None:
            events.close()
        if tracker is not None:
            tracker.finish("FINISHED" if finished else "FAILED")
            tracker.report_dropped(channel.log)
        shutil.rmtree(workdir, ignore_errors=True)  # Ray has copied every checkpoint to storage


def _track_outcome(tracker: Tracker, result: Any, plots: list[Path], checkpoint: Path, last_epoch: int) -> None:
    """The final figures, the plots and the final checkpoint into the job's MLflow run."""
    outcome = {"rotation_accuracy": result.rotation_accuracy, "suite_accuracy": result.suite_accuracy}
    tracker.log_metrics(result_metrics(outcome), step=last_epoch)
    tracker.log_json({**outcome, "per_class": result.per_class, "history": result.history}, "results.json")
    for path in plots:
        tracker.log_artifact(path, "plots")
    if checkpoint.is_file():
        tracker.log_artifact(checkpoint, "checkpoint")


def _write_plots(model: Any, test: Any, rotation: dict[str, float], history: list[dict[str, Any]], spec: TrainSpec,
                 ctx: JobContext, channel: JobChannel, scratch: Path | None) -> list[Path]:
    """Pictures next to the checkpoints: accuracy against angle, the training curve (loss and
    accuracy per epoch), the most rotated test digits with predictions, and CapsNet
    reconstructions. With URI storage they go to ``scratch`` (for MLflow), if one is given."""
    from capsnet_core.plots import (
        plot_accuracy_vs_angle,
        plot_reconstructions,
        plot_rotated_grid,
        plot_training_curves,
    )
    from services.results.plot_labels import curve_label, plot_title

    if is_uri(ctx.artifacts) and scratch is None:
        return []
    folder = scratch if scratch is not None and is_uri(ctx.artifacts) else Path(ctx.artifacts) / ctx.job_id / "plots"
    try:
        spec_dict, job = spec.to_dict(), getattr(spec, "name", None) or ctx.job_id
        title = plot_title(job, "train", spec.model, spec_dict)
        paths = [plot_accuracy_vs_angle({curve_label(job, "train", spec.model, spec_dict): rotation},
                                        folder / "accuracy_vs_angle.png", title=title),
                 plot_training_curves(history, folder / "training_curve.png", title=title),
                 plot_rotated_grid(model, test.images, test.labels, max(spec.eval_angles, key=abs),
                                   folder / "rotated_digits.png", classes=test.classes)]
        if model_reconstructs(spec.model, **spec.model_kwargs()):
            paths.append(plot_reconstructions(model, test.images, folder / "reconstructions.png"))
        if not is_uri(ctx.artifacts):
            channel.log(f"plots written to {folder}", plots=[str(p) for p in paths])
        return paths
    except Exception as exc:  # pictures are a courtesy: never fail a trained job over them
        channel.log(f"could not write plots: {exc}", level="warning")
        return []


def _report_resume(result: Any, spec: TrainSpec, rank: int, world_size: int, device: Any,
                   resume_file: Path | None, workdir: Path, channel: JobChannel) -> None:
    import ray.train

    if result.start_epoch:
        channel.log(f"rank {rank}: resumed after epoch {result.start_epoch} of {spec.epochs}", rank=rank,
                    resumed_from_epoch=result.start_epoch)
    if result.start_epoch >= spec.epochs and resume_file is not None:
        # Killed after its last checkpoint but before completing: nothing was trained in this
        # attempt, so report the evaluation with the same weights once more.
        metrics = {**result.history[-1], "rotation_accuracy": result.rotation_accuracy,
                   "per_class": result.per_class, "confusion": result.confusion, "history": result.history,
                   "world_size": world_size,
                   "device": str(device)}
        ray_checkpoint = None
        if rank == 0:
            (workdir / "resume").mkdir(exist_ok=True)
            resume_file.replace(workdir / "resume" / CHECKPOINT_FILE)
            ray_checkpoint = ray.train.Checkpoint.from_directory(str(workdir / "resume"))
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=f"epoch-{spec.epochs:04d}-final")


def choose_resume(ctx: JobContext, channel: JobChannel) -> str | None:
    """The URI of the newest intact checkpoint the job record lists (None: start at epoch 0),
    and a run folder Ray Train can restore. Runs in the driver, before the ``TorchTrainer``.

    Each recorded checkpoint is checked against its size and SHA-256 and loaded once; one that
    fails is skipped with a warning event naming the file and why. Then Ray's run snapshot is
    checked: one Ray could not load (empty, half-written, naming a deleted checkpoint) would
    fail every attempt in ``TrainController.__init__``, so it is moved aside
    (``*.corrupt-<ms>``) and Ray starts a fresh snapshot while capsctl supplies the checkpoint.
    """
    import ray

    record = channel.redis.attempt(channel.queue.get, ctx.job_id, what="reading the job record")
    entries = parse_entries(record.checkpoints) if record is not None else []
    legacy = (record.checkpoint if record is not None else None) or ctx.resume_checkpoint
    candidates = resume_candidates(entries, legacy)
    chosen = None
    if candidates:
        with tempfile.TemporaryDirectory(prefix=f"capsctl-{ctx.job_id}-verify-") as scratch:
            chosen, _, skipped = walk_back(candidates, fetch_to(Path(scratch), CHECKPOINT_FILE),
                                           check_loads=lambda path: load_checkpoint(path))
        for message, fields in iter_warnings(skipped):
            channel.log(message, **fields)
        for folder in _local_folders(skipped):  # the attempt writes these epochs afresh
            moved = quarantine(folder)
            channel.log(f"damaged checkpoint folder {folder} moved aside to {moved.name}", level="warning",
                        checkpoint_quarantined=str(moved))
        if chosen is None:
            channel.log(f"no intact checkpoint left of {len(candidates)} recorded: starting from epoch 0",
                        level="warning", resumed_from_epoch=0)
        elif skipped:
            channel.log(f"resuming from the checkpoint of epoch {chosen.epoch} ({chosen.uri}), "
                        f"the newest intact one", level="warning", resume_checkpoint=chosen.uri)
    run_dir = Path(ctx.artifacts) / ctx.job_id
    if not is_uri(ctx.artifacts) and run_dir.is_dir():
        problem = ray_snapshot_problem(run_dir, ray.__version__, chosen.epoch if chosen is not None else 0)
        if problem is not None:
            moved = quarantine(run_dir / RAY_SNAPSHOT_FILE)
            channel.log(f"Ray Train's run snapshot {run_dir / RAY_SNAPSHOT_FILE} is {problem}: moved aside to "
                        f"{moved.name}; resuming from capsctl's own record instead", level="warning",
                        ray_snapshot=str(moved), reason=problem)
    return chosen.uri if chosen is not None else None


def _local_folders(skipped: list[Skipped]) -> list[Path]:
    """The skipped checkpoints' folders that are on local disk and still there."""
    return [Path(s.entry.uri) for s in skipped if not is_uri(s.entry.uri) and Path(s.entry.uri).is_dir()]


def run_state_vanished(exc: BaseException, ctx: JobContext) -> str | None:
    """An infrastructure loss when Ray Train's controller could not find a folder of this job's
    own run (a checkpoint removed under it: a lost attempt still running beside a newer one, a
    deleted epoch folder), never the job's error: the next attempt moves the snapshot aside and
    resumes from the newest intact checkpoint."""
    from services.runs.error_text import root_cause

    cause = root_cause(exc)
    run_dir = join(ctx.artifacts, ctx.job_id)
    text = f"{cause.type_name}: {cause.message}"
    if ("FileNotFoundError" in text or "Path not found" in text) and run_dir in text:
        return f"run state vanished under the attempt ({cause.line()})"
    return None


def _checkpoint_location(ctx: JobContext, ray_path: str) -> str:
    """The checkpoint as a location capsctl can open: Ray reports the path inside its filesystem
    (``bucket/runs/J/epoch-0003`` for ``s3://bucket/runs``), which drops the scheme."""
    if not is_uri(ctx.artifacts):
        return ray_path
    return join(ctx.artifacts, ctx.job_id, ray_path.rstrip("/").rsplit("/", 1)[-1])


def run_train_job(spec: TrainSpec, ctx: JobContext) -> JobResult:
    """Run one train job to the end on the connected Ray cluster; returns the job's result document."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_job_limits(spec, ctx.max_params)
    use_gpu = spec.gpus > 0
    channel = JobChannel(ctx, check_interval_s=0.0)
    resume = choose_resume(ctx, channel)
    target = tracking_target(spec, ctx.job_id)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "ctx": asdict(ctx), "resume": resume,
                           "tracking": asdict(target) if target is not None else None},
        scaling_config=ScalingConfig(num_workers=spec.ranks, use_gpu=use_gpu,
                                     # a single rank may hold a share of a GPU (--gpus 0.5)
                                     resources_per_worker={"GPU": min(1, spec.gpus), "CPU": 1} if use_gpu
                                     else {"CPU": 1}),
        run_config=RunConfig(
            name=ctx.job_id, storage_path=ctx.artifacts,
            # The queue owns retries (with backoff, across workers); Ray Train must not retry on its own.
            failure_config=FailureConfig(max_failures=0),
            # Ray deletes older checkpoints as the record forgets them: the fallbacks stay on disk.
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    # The next few seconds are Ray Train starting a controller and one process per rank, each
    # importing torch; say so, or `logs -f` looks stuck.
    channel.log(f"starting Ray Train: a controller and {spec.ranks} rank process(es) "
                f"({'NCCL on GPUs' if use_gpu else 'gloo on CPUs'})")
    # Each rank records the Ray node it runs on (JobChannel.report_node): a failed rank's node is asked about.
    outcome = fit_or_stop(trainer.fit, channel,
                          lost=lambda exc: infrastructure_loss(exc) or run_state_vanished(exc, ctx)
                          or node_loss(exc, channel.rank_nodes()))
    metrics = dict(outcome.metrics or {})
    tb_dir = tensorboard_dir(ctx.artifacts, ctx.job_id)
    return JobResult.new(
        "train",
        rotation_accuracy=metrics.get("rotation_accuracy", {}),
        per_class=metrics.get("per_class", {}),
        confusion=metrics.get("confusion", {}),
        suite_accuracy=metrics.get("suite_accuracy", {}),
        # the final figures are above; the history keeps the per-epoch curve
        history=[{k: v for k, v in h.items() if k != "confusion"} for h in metrics.get("history", [])
                    if isinstance(h, dict)],
        world_size=metrics.get("world_size", spec.ranks),
        device=metrics.get("device"),
        checkpoint=_checkpoint_location(ctx, outcome.checkpoint.path) if outcome.checkpoint is not None else None,
        validation=describe_split(load_dataset(spec.dataset, "train", root=ctx.data_dir), spec.val_split).to_dict(),
        tensorboard=str(tb_dir.absolute()) if tb_dir is not None and tb_dir.is_dir() else None,
    )
