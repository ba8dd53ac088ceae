"""Train and eval jobs on Ray: one Ray Train ``TorchTrainer`` run (Train V2 API) per train job.

``num_workers`` = the job's ranks (``--gpus N``: N GPU workers with NCCL; ``--workers N``: N
CPU workers with gloo). Every rank loads the dataset itself, keeps it on its device and trains
on its own shard of a shared permutation (``capsnet_core.train``); DDP averages gradients.
Rank 0 evaluates, writes checkpoints, and publishes progress and log events to Redis.

Checkpoints go through ``ray.train.report`` into ``RunConfig(storage_path=<artifacts>,
name=<job id>)``: a local folder or any URI Ray accepts (``s3://``...). Because the run name
is the job id, a later attempt of the same job (after its worker died) finds Ray Train's
checkpoint snapshot in that folder and ``ray.train.get_checkpoint()`` hands back the last
epoch's checkpoint: the job resumes there instead of at epoch 0.

Redis may go away while a job trains (restart, failover): the ranks keep training and
checkpointing to storage. ``JobChannel`` tries each Redis write once and, while Redis is down,
drops progress and log events (counted, and reported in one log event with ``events_dropped``
once Redis answers), keeps the newest checkpoint URI to record later, and treats "cannot ask"
as "no reason to stop". The outcome is the worker's to record, and that one is never dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.checkpoint import load_checkpoint, model_from_checkpoint
from capsnet_core.evaluate import evaluate, evaluate_suites
from capsnet_core.train import angle_key, ddp_options, shard_indices

from .config import Settings, redis_client
from .events import EventLog
from .jobspec import EvalSpec, SpecError, TrainSpec, TuneSpec, check_model_size
from .keys import Keys
from .queue import JobQueue
from .redis_retry import RedisRetry, no_retry_client_kwargs
from .sources import SourceRefused, check_source_allowed

CHECKPOINT_FILE = "checkpoint.pt"

_DROPPED = object()  # what a Redis write returns when Redis was unavailable


class JobCancelled(Exception):
    """The job was cancelled (or its lease was taken over) while it ran."""


class JobRejected(Exception):
    """The job asks for something no attempt may do (an unsafe checkpoint, a source outside the
    allowed roots, an oversize model): it fails for good, without retries. One-line message."""


def check_job_limits(spec: TrainSpec | TuneSpec) -> None:
    """The submit-time size check again, on the worker: a spec written straight into Redis
    must not get a model the worker cannot hold."""
    try:
        check_model_size(spec, Settings.from_env().max_params)
    except SpecError as err:
        raise JobRejected(str(err)) from None


def assigned_device() -> str:
    """CUDA only when Ray gave this task or actor a GPU: Ray 2.60 no longer hides GPUs from
    tasks that asked for none, so ``torch.cuda.is_available()`` would land an eval on a GPU
    another job holds."""
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class AttemptLost(Exception):
    """The attempt lost the Ray processes or node it ran on: an infrastructure loss, not the
    job's own error (the queue charges it to ``max_lost``, never to ``max_retries``)."""


# How long a failed attempt whose ranks ran on several Ray nodes waits for Ray to declare one of
# those nodes dead before the failure counts as the job's own: a surviving rank's collective error
# (gloo/NCCL peer gone, timeout) reaches the driver within a second, but Ray's GCS declares a
# killed node dead only after its health checks fail (3 s period x 5 failures by default, plus
# the 10 s timeout of the last one).
NODE_DEATH_GRACE_S = 30.0


def process_gone(error: BaseException | None) -> bool:
    """Is ``error`` Ray saying a process (actor, worker) or its node is gone, as opposed to an
    exception some code raised? An actor whose ``__init__`` raised is code, not infrastructure."""
    from ray.exceptions import LocalRayletDiedError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

    if error is None or isinstance(error, RayTaskError):  # code that ran raised it (maybe re-raising)
        return False
    if isinstance(error, RayActorError):
        return not error.actor_init_failed
    return isinstance(error, NodeDiedError | WorkerCrashedError | LocalRayletDiedError)


def infrastructure_loss(exc: BaseException) -> str | None:
    """Why what ``trainer.fit()`` raised is an infrastructure loss, or None when it is the job's
    own error (an exception raised by the training function, a bad spec...).

    Ray Train V2 reports every rank failure as a ``WorkerGroupError`` and charges all of them to
    ``FailureConfig.max_failures``; its ``worker_failures`` tells them apart. A rank whose process
    (or node) is gone fails Ray's health check of it: ``WorkerHealthCheckFailedError`` wrapping a
    ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``) or ``NodeDiedError`` /
    ``WorkerCrashedError`` / ``LocalRayletDiedError``, or ``WorkerHealthCheckTimeoutError`` when
    the process stopped answering (a partitioned node). An exception raised by the training
    function reaches us unwrapped, so a user's own ``ActorDiedError`` stays the job's error. As in
    Ray's own preemption policy, one dead rank makes the whole failure a loss: the surviving ranks
    routinely fail with collateral errors (collective aborted, connection reset by the dead peer).
    The controller's start-up failures (a rank's node died while the group started, or its
    resources vanished) are losses too. A job that kills its own rank processes every time is
    bounded by ``max_lost``. (When the surviving rank's error arrives before Ray noticed the dead
    one, see ``node_loss``.)
    """
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
        WorkerHealthCheckFailedError,
        WorkerHealthCheckTimeoutError,
    )
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError):
        dead = sorted(rank for rank, error in exc.worker_failures.items()
                      if isinstance(error, WorkerHealthCheckTimeoutError)
                      or (isinstance(error, WorkerHealthCheckFailedError) and process_gone(error.health_check_failure)))
        if not dead:
            return None
        first = exc.worker_failures[dead[0]]
        cause = getattr(first, "health_check_failure", first)
        return f"rank(s) {', '.join(map(str, dead))} lost their Ray process or node ({describe_error(cause)})"
    if isinstance(exc, ControllerError) and isinstance(
            exc.controller_failure, WorkerGroupStartupFailedError | WorkerGroupStartupTimeoutError):
        return f"Ray Train could not start the ranks: {str(exc.controller_failure).splitlines()[0][:200]}"
    if process_gone(exc):  # the controller actor itself (on the driver's node) is gone
        return f"Ray Train's controller was lost ({type(exc).__name__})"
    return None


def describe_error(error: BaseException) -> str:
    """``Type: last line of the message`` (Ray's messages end with the useful line), short."""
    detail = str(error).strip().splitlines()
    return f"{type(error).__name__}{': ' + detail[-1][:200] if detail else ''}"


def dead_nodes(node_ids: set[str]) -> list[str]:
    """Those of ``node_ids`` that Ray's GCS has declared dead (an id it does not know is not dead)."""
    import ray

    alive = {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}
    return sorted(n for n in node_ids if alive.get(n) is False)


def node_loss(exc: BaseException, node_ids: set[str], grace_s: float = NODE_DEATH_GRACE_S) -> str | None:
    """Why a rank failure that ``infrastructure_loss`` took for the job's own is a loss after all:
    one of the Ray nodes the attempt's ranks ran on is dead. With ranks split over two nodes, the
    surviving rank's collective error (gloo/NCCL peer gone, a timeout) can reach the driver before
    Ray's health check of the dead rank fails, so for a multi-node attempt wait up to ``grace_s``
    for Ray to declare one of the nodes dead. Only rank failures qualify: a bad config is never a
    node's fault."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    if not node_ids or not isinstance(exc, WorkerGroupError):
        return None
    deadline = time.monotonic() + (grace_s if len(node_ids) > 1 else 0.0)
    while True:
        dead = dead_nodes(node_ids)
        if dead:
            first = next(iter(exc.worker_failures.values()), None)
            return (f"Ray node(s) {', '.join(n[:8] for n in dead)} of the attempt's ranks died"
                    + (f" (a rank reported {describe_error(first)})" if first is not None else ""))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@dataclass(frozen=True)
class JobContext:
    """What a run needs to know about its job; plain data so Ray can ship it to every rank."""

    job_id: str
    lease_token: str
    attempt: int
    redis_url: str
    redis_prefix: str
    artifacts: str  # Ray storage_path: local folder or URI
    data_dir: str | None = None
    resume_checkpoint: str | None = None  # the job record's last checkpoint (earlier attempt)
    started_at: float = 0.0  # wall-clock time the worker started this attempt (start-up metric)


class JobChannel:
    """Rank-side connection to the job's Redis record: fenced progress, events, cancel checks.

    Never blocks training on Redis: every call is tried once (see ``RedisRetry.attempt``)."""

    def __init__(self, ctx: JobContext, check_interval_s: float = 1.0) -> None:
        self.ctx = ctx
        client = redis_client(ctx.redis_url, **no_retry_client_kwargs())
        keys = Keys(ctx.redis_prefix)
        self.queue = JobQueue(client, keys)
        self.events = EventLog(client, keys)
        self.redis = RedisRetry(logging.getLogger("capsctl.rank"))
        self._check_interval = check_interval_s
        self._last_check = 0.0
        self._stop_reason: str | None = None
        self.events_dropped = 0  # not yet reported
        self._pending_checkpoint: str | None = None
        self._flushing = False

    def _send(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """``fn(*args)`` once; ``_DROPPED`` while Redis is away. After an outage, first records
        what was kept back (the newest checkpoint URI, how many events were dropped)."""
        value = self.redis.attempt(fn, *args, what=what, default=_DROPPED, **kwargs)
        if value is not _DROPPED and not self._flushing:
            self._flush()
        return value

    def _flush(self) -> None:
        self._flushing = True
        try:
            if self._pending_checkpoint is not None:
                uri = self._pending_checkpoint
                if self._send(self.queue.set_checkpoint, self.ctx.job_id, self.ctx.lease_token, uri,
                              what="recording a checkpoint") is not _DROPPED:
                    self._pending_checkpoint = None
            n = self.events_dropped
            if n and self._send(self.events.log, self.ctx.job_id,
                                f"{n} progress/log event(s) dropped while Redis was unavailable",
                                lease_token=self.ctx.lease_token, what="logging", level="warning", events_dropped=n) is not _DROPPED:
                self.events_dropped -= n
        finally:
            self._flushing = False

    def stop_reason(self) -> str | None:
        """Why this rank must stop (cancel requested, lease lost), checked at most once a second.
        While Redis cannot be asked, there is no reason to stop: training goes on."""
        now = time.monotonic()
        if self._stop_reason is None and now - self._last_check >= self._check_interval:
            self._last_check = now
            record = self._send(self.queue.get, self.ctx.job_id, what="checking for a cancel")
            if record is _DROPPED:
                return None  # Redis is away: no reason to stop, training goes on
            if record is None:
                self._stop_reason = "job record deleted"
            elif record.cancel_requested:
                self._stop_reason = "cancel requested"
            elif record.lease_token != self.ctx.lease_token:
                self._stop_reason = "lease lost to a newer attempt"
        return self._stop_reason

    def should_stop(self) -> bool:
        return self.stop_reason() is not None

    def progress(self, event: dict[str, Any]) -> None:
        """Publish a training event and keep the latest one in the job record (fenced)."""
        if self._send(self.events.publish, self.ctx.job_id, "progress", event,
                      lease_token=self.ctx.lease_token, what="publishing progress") is _DROPPED:
            self.events_dropped += 1
            return
        if event.get("type") in ("epoch", "eval") or event.get("step", 0) % 5 == 0:
            self._send(self.queue.report_progress, self.ctx.job_id, self.ctx.lease_token, event, publish=False,
                       what="recording progress")

    def log(self, message: str, **extra: Any) -> None:
        if self._send(self.events.log, self.ctx.job_id, message, lease_token=self.ctx.lease_token,
                      what="logging", **extra) is _DROPPED:
            self.events_dropped += 1

    def set_checkpoint(self, uri: str) -> None:
        """Record the newest checkpoint in the job record (fenced); kept for later while Redis is away."""
        self._pending_checkpoint = uri
        self._flush()


def _train_config(spec: TrainSpec) -> TrainConfig:
    return TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, lr_decay=spec.lr_decay,
                       augment=spec.augment, seed=spec.seed, eval_angles=tuple(spec.eval_angles),
                       eval_suites=tuple(spec.eval_suites))


def _checkpoint_epoch(path: str) -> int:
    match = re.search(r"epoch-(\d+)", path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else -1


def _latest_checkpoint(from_ray: Any, from_record: str | None) -> Any:
    """The later of Ray Train's own snapshot and the checkpoint recorded in the job record.

    Ray writes its run snapshot asynchronously after ``report`` returns, so a worker killed
    right after an epoch can leave Redis one checkpoint ahead of the snapshot (or the other
    way round): take whichever names the later epoch.
    """
    import ray.train

    candidates = [c for c in (from_ray, ray.train.Checkpoint(from_record) if from_record else None) if c is not None]
    return max(candidates, key=lambda c: _checkpoint_epoch(c.path), default=None)


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
    niceness = set_process_niceness(0) if os.getpriority(os.PRIO_PROCESS, 0) > 0 else 0

    torch.manual_seed(spec.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(spec.model, **spec.model_kwargs())
    # Moves to this rank's device (CapsNet lays out its weights for it); DDP when world_size > 1.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(model))
    train = load_dataset(spec.dataset, "train", root=ctx.data_dir).subset(spec.train_subset)
    test = load_dataset(spec.dataset, "test", root=ctx.data_dir).subset(spec.test_subset) if rank == 0 else None

    # Which images this rank trains on in its first epoch: the test suite checks ranks differ.
    shard = shard_indices(len(train), epoch=0, seed=spec.seed, rank=rank, world_size=world_size)
    fingerprint = hashlib.sha1(shard.numpy().tobytes()).hexdigest()[:12]
    # Ready to train: how long the worker's hand-over took (Ray Train's processes, data, model).
    startup = round(time.time() - ctx.started_at, 3) if ctx.started_at else None
    node_id = ray.get_runtime_context().get_node_id()  # which Ray node to blame if this rank is lost
    channel.log(f"rank {rank}/{world_size} on {device}, Ray node {node_id[:8]}: {shard.numel()} images per epoch, "
                f"shard {fingerprint}"
                + (f"; ready {startup:.1f} s after the worker took the job" if startup is not None else "")
                + (f"; running at nice {niceness} (Ray's worker niceness; could not lower it)" if niceness else ""),
                rank=rank, world_size=world_size, nice=niceness, torch_threads=torch.get_num_threads(),
                shard_size=int(shard.numel()), shard_fingerprint=fingerprint, device=str(device), node_id=node_id,
                **({"startup_seconds": startup} if rank == 0 and startup is not None else {}))

    workdir = Path(tempfile.mkdtemp(prefix=f"capsctl-{ctx.job_id}-r{rank}-"))
    resume_file: Path | None = None
    checkpoint = _latest_checkpoint(ray.train.get_checkpoint(), ctx.resume_checkpoint)
    if checkpoint is not None:
        resume_file = workdir / "resume.pt"
        checkpoint.to_directory(str(workdir / "resume"))
        (workdir / "resume" / CHECKPOINT_FILE).replace(resume_file)

    def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
        # ray.train.report is a barrier on every rank; rank 0 hands over the checkpoint it just
        # wrote, and its metrics (with the whole history, small) become the run's result.
        epoch = history[-1]["epoch"]
        ray_checkpoint = ray.train.Checkpoint.from_directory(str(saved.parent)) if saved is not None else None
        metrics = {**history[-1], "history": history, "world_size": world_size, "device": str(device)}
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if rank == 0:
            uri = f"{ctx.artifacts.rstrip('/')}/{ctx.job_id}/epoch-{epoch:04d}"
            channel.set_checkpoint(uri)

    try:
        result = fit(model, train, test, _train_config(spec), rank=rank, world_size=world_size,
                     checkpoint_path=workdir / "epoch" / CHECKPOINT_FILE if rank == 0 else None,
                     resume_from=resume_file, on_progress=channel.progress if rank == 0 else None,
                     on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        _report_resume(result, spec, rank, world_size, device, resume_file, workdir, channel)
        if rank == 0 and test is not None:
            _write_plots(model, test, result.rotation_accuracy, spec, ctx, channel)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # Ray has copied every checkpoint to storage


def _write_plots(model: Any, test: Any, rotation: dict[str, float], spec: TrainSpec, ctx: JobContext,
                 channel: JobChannel) -> None:
    """Pictures next to the checkpoints (local artifact folders only): accuracy against angle,
    the most rotated test digits with predictions, and CapsNet reconstructions."""
    if "://" in ctx.artifacts:
        return
    from capsnet_core.plots import plot_accuracy_vs_angle, plot_reconstructions, plot_rotated_grid

    folder = Path(ctx.artifacts) / ctx.job_id / "plots"
    try:
        paths = [plot_accuracy_vs_angle({spec.model: rotation}, folder / "accuracy_vs_angle.png",
                                        title=f"{spec.model} trained with {spec.augment}"),
                 plot_rotated_grid(model, test.images, test.labels, max(spec.eval_angles, key=abs),
                                   folder / "rotated_digits.png", classes=test.classes)]
        if spec.model == "capsnet" and spec.model_kwargs().get("decoder", True):
            paths.append(plot_reconstructions(model, test.images, folder / "reconstructions.png"))
        channel.log(f"plots written to {folder}", plots=[str(p) for p in paths])
    except Exception as exc:  # pictures are a courtesy: never fail a trained job over them
        channel.log(f"could not write plots: {exc}", level="warning")


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
                   "per_class": result.per_class, "history": result.history, "world_size": world_size,
                   "device": str(device)}
        ray_checkpoint = None
        if rank == 0:
            (workdir / "resume").mkdir(exist_ok=True)
            resume_file.replace(workdir / "resume" / CHECKPOINT_FILE)
            ray_checkpoint = ray.train.Checkpoint.from_directory(str(workdir / "resume"))
        ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=f"epoch-{spec.epochs:04d}-final")


def rank_nodes(channel: JobChannel, since: str | None) -> set[str]:
    """The Ray nodes this attempt's ranks ran on, from their start-up log events after ``since``
    (empty when Redis could not be asked)."""
    if since is None:
        return set()
    events = channel.redis.attempt(channel.events.read, channel.ctx.job_id, since, count=10_000,
                                   what="reading the ranks' nodes", default=[])
    return {e["data"]["node_id"] for _, e in events
            if e.get("type") == "log" and "rank" in e["data"] and e["data"].get("node_id")}


def run_train_job(spec: TrainSpec, ctx: JobContext) -> dict[str, Any]:
    """Run one train job to the end on the connected Ray cluster; returns the job's result document."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_job_limits(spec)
    use_gpu = spec.gpus > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "ctx": asdict(ctx)},
        scaling_config=ScalingConfig(num_workers=spec.ranks, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(
            name=ctx.job_id, storage_path=ctx.artifacts,
            # The queue owns retries (with backoff, across workers); Ray Train must not retry on its own.
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    channel = JobChannel(ctx, check_interval_s=0.0)
    # The next few seconds are Ray Train starting a controller and one process per rank, each
    # importing torch; say so, or `logs -f` looks stuck.
    channel.log(f"starting Ray Train: a controller and {spec.ranks} rank process(es) "
                f"({'NCCL on GPUs' if use_gpu else 'gloo on CPUs'})")
    # Each rank logs the Ray node it runs on; this attempt's are the ones after this event.
    since = channel.redis.attempt(channel.events.last_id, ctx.job_id, what="reading the event stream")
    try:
        outcome = trainer.fit()
    except Exception as exc:
        reason = channel.stop_reason()
        if reason is not None:
            raise JobCancelled(reason) from exc
        lost = infrastructure_loss(exc) or node_loss(exc, rank_nodes(channel, since))
        if lost is not None:
            raise AttemptLost(lost) from exc
        raise
    reason = channel.stop_reason()
    if reason is not None:
        raise JobCancelled(reason)
    metrics = dict(outcome.metrics or {})
    result = {
        "rotation_accuracy": metrics.get("rotation_accuracy", {}),
        "per_class": metrics.get("per_class", {}),
        "suite_accuracy": metrics.get("suite_accuracy", {}),
        "history": metrics.get("history", []),
        "world_size": metrics.get("world_size", spec.ranks),
        "device": metrics.get("device"),
        "checkpoint": outcome.checkpoint.path if outcome.checkpoint is not None else None,
    }
    return result


def resolve_checkpoint(source: str, queue: JobQueue) -> str:
    """A checkpoint folder/URI from a job id (its last checkpoint) or a path given directly."""
    record = queue.get(source)
    if record is not None:
        if not record.checkpoint:
            raise ValueError(f"job {source} has no checkpoint yet (state {record.state})")
        return record.checkpoint
    return source


def evaluate_checkpoint(checkpoint_uri: str, dataset: str, angles: list[float], test_subset: int | None = None,
                        data_dir: str | None = None, suites: list[str] | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Load a capsnet_core checkpoint (a file, or a folder/URI holding checkpoint.pt) and measure
    its accuracy on the test set rotated by each angle, on `device` (``assigned_device()`` in a
    Ray task). The file is read with ``weights_only`` (``CheckpointRejected`` if unsafe)."""
    from ray.train import Checkpoint

    from capsnet_core.evaluate import configure_backends

    configure_backends(torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint_uri)
        if not path.is_file():
            Checkpoint(checkpoint_uri).to_directory(tmp)
            path = Path(tmp) / CHECKPOINT_FILE
        payload = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(payload, device)
    test = load_dataset(dataset, "test", root=data_dir).subset(test_subset)
    results = {angle_key(a): evaluate(model, test.images, test.labels, angle=a) for a in angles}
    rotation = {k: r.accuracy for k, r in results.items()}
    return {"checkpoint": checkpoint_uri, "model": model.name, "device": device, "history": list(payload["history"]),
            "rotation_accuracy": rotation, "per_class": {k: r.per_class for k, r in results.items()},
            "suite_accuracy": evaluate_suites(model, test, suites or [], rotation, data_root=data_dir)}


def _eval_task(spec_dict: dict[str, Any], checkpoint_uri: str, data_dir: str | None) -> dict[str, Any]:
    spec = EvalSpec.model_validate(spec_dict)
    result = evaluate_checkpoint(checkpoint_uri, spec.dataset, spec.angles, spec.test_subset, data_dir,
                                 spec.eval_suites, device=assigned_device())
    result.pop("history")
    return result


def run_eval_job(spec: EvalSpec, ctx: JobContext, queue: JobQueue) -> dict[str, Any]:
    """Evaluate a trained model on the rotated test set as a Ray task (on a GPU if the spec asks)."""
    import ray

    from capsnet_core.checkpoint import CheckpointRejected

    try:
        # The source and what a job id resolves to must both lie within the allowed roots.
        roots = Settings.from_env().eval_roots
        source = check_source_allowed(spec.source, ctx.artifacts, roots)
        checkpoint_uri = check_source_allowed(resolve_checkpoint(source, queue), ctx.artifacts, roots)
    except SourceRefused as err:
        raise JobRejected(str(err)) from None
    resources = spec.resources()
    task = ray.remote(num_cpus=max(1, resources.get("cpus", 1)), num_gpus=resources.get("gpus", 0))(_eval_task)
    try:
        return ray.get(task.remote(spec.to_dict(), checkpoint_uri, ctx.data_dir))
    except CheckpointRejected as exc:  # Ray re-raises the task's error as an instance of its cause
        raise JobRejected(str(getattr(exc, "cause", None) or exc)) from None
    except Exception as exc:
        raise RuntimeError(f"evaluation of {checkpoint_uri} failed: {exc}\n{traceback.format_exc()}") from exc
