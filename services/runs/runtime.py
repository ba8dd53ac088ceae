"""The job runtime every kind shares: what a run knows about its job (``JobContext``), the
rank-side Redis channel (``JobChannel``), how a run ends other than with a result
(``JobCancelled``, ``JobRejected``, ``AttemptLost``) and ``fit_or_stop``, which turns a Ray
run's end into one of them.

Redis may go away while a job trains (restart, failover): the ranks keep training and
checkpointing to storage. ``JobChannel`` tries each Redis write once and, while Redis is down,
drops progress and log events (counted, and reported in one log event with ``events_dropped``
once Redis answers), keeps the newest checkpoint URI to record later, and treats "cannot ask"
as "no reason to stop". The outcome is the worker's to record, and that one is never dropped.

No Ray import at module level: the pure modules (``trial_store``) import this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from services.config import DEFAULT_MAX_PARAMS
from services.queue.attempt import AttemptWriter
from services.queue.connection import redis_client
from services.queue.keys import Keys
from services.queue.redis_retry import RedisRetry, no_retry_client_kwargs
from services.runs.checkpoints import KEEP_CHECKPOINTS
from services.spec.errors import SpecError
from services.spec.jobspec import TrainSpec, TuneSpec, check_model_size

T = TypeVar("T")

CHECKPOINT_FILE = "checkpoint.pt"

_DROPPED = object()  # what a Redis write returns when Redis was unavailable


class JobCancelled(Exception):
    """The job was cancelled (or its lease was taken over) while it ran."""


TIME_LIMIT_REASON = "time limit reached"
LEASE_LOST_REASON = "lease lost to a newer attempt"


class TimeLimitReached(JobCancelled):
    """The attempt ran past the job's ``time_limit_s``: stopped, and the job fails with no retry."""


class JobRejected(Exception):
    """The job asks for something no attempt may do (an unsafe checkpoint, a source outside the
    allowed roots, an oversize model): it fails for good, without retries. One-line message."""


def check_job_limits(spec: TrainSpec | TuneSpec, max_params: int) -> None:
    """The submit-time size check again, on the worker: a spec written straight into Redis
    must not get a model the worker cannot hold. ``max_params`` is the worker's own setting
    (``JobContext.max_params``), never re-read from the environment mid-run."""
    try:
        check_model_size(spec, max_params)
    except SpecError as err:
        raise JobRejected(str(err)) from None


def assigned_device() -> str:
    """CUDA only when Ray gave this task or actor a GPU: Ray 2.60 no longer hides GPUs from
    tasks that asked for none, so ``torch.cuda.is_available()`` would land an eval on a GPU
    another job holds."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class AttemptLost(Exception):
    """The attempt lost the Ray processes or node it ran on: an infrastructure loss, not the
    job's own error (the queue charges it to ``max_lost``, never to ``max_retries``)."""


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
    niceness: int = 0  # the worker's own nice level: its ranks run at it (``adopt_worker_niceness``)
    deadline: float | None = None  # wall-clock time past which the attempt stops (spec.time_limit_s)
    # The worker's Settings a run needs, read once by the worker (environment, <state_dir>/env,
    # its command line): a run never calls Settings.from_env, which would miss the latter two.
    max_params: int = DEFAULT_MAX_PARAMS
    eval_roots: tuple[str, ...] = ()


class JobChannel:
    """Rank-side connection to the job's Redis record: fenced progress, events, cancel checks.

    Never blocks training on Redis: every call is tried once (see ``RedisRetry.attempt``)."""

    def __init__(self, ctx: JobContext, check_interval_s: float = 1.0) -> None:
        self.ctx = ctx
        client = redis_client(ctx.redis_url, **no_retry_client_kwargs())
        keys = Keys(ctx.redis_prefix)
        self.queue = AttemptWriter(client, keys)  # only the attempt's own reads and fenced writes
        self.events = self.queue.events
        self.redis = RedisRetry(logging.getLogger("capsctl.rank"))
        self._check_interval = check_interval_s
        self._last_check = 0.0
        self._stop_reason: str | None = None
        self.events_dropped = 0  # not yet reported
        self._pending_checkpoint: tuple[str, dict[str, Any] | None] | None = None  # (uri, entry)
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
                uri, entry = self._pending_checkpoint
                if self._send(self.queue.set_checkpoint, self.ctx.job_id, self.ctx.lease_token, uri, entry,
                              keep=KEEP_CHECKPOINTS, what="recording a checkpoint") is not _DROPPED:
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
        if self._stop_reason is None and self.ctx.deadline is not None and time.time() > self.ctx.deadline:
            self._stop_reason = TIME_LIMIT_REASON
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
                self._stop_reason = LEASE_LOST_REASON
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

    def report_node(self, node_id: str) -> None:
        """Record the Ray node this rank runs on, where the driver looks when a rank fails."""
        self._send(self.queue.add_rank_node, self.ctx.job_id, self.ctx.lease_token, node_id,
                   what="recording the rank's node")

    def rank_nodes(self) -> set[str]:
        """The Ray nodes this attempt's ranks recorded (empty when Redis could not be asked)."""
        nodes = self._send(self.queue.rank_nodes, self.ctx.job_id, self.ctx.lease_token,
                           what="reading the ranks' nodes")
        return set() if nodes is _DROPPED else nodes

    def log(self, message: str, **extra: Any) -> None:
        if self._send(self.events.log, self.ctx.job_id, message, lease_token=self.ctx.lease_token,
                      what="logging", **extra) is _DROPPED:
            self.events_dropped += 1

    def warn(self, message: str, **extra: Any) -> None:
        """A warning event (what ``log`` posts at level warning)."""
        self.log(message, level="warning", **extra)

    def set_checkpoint(self, uri: str, entry: dict[str, Any] | None = None) -> None:
        """Record the newest checkpoint (and its {epoch, uri, size, sha256} ``entry``) in the job
        record (fenced); kept for later while Redis is away."""
        self._pending_checkpoint = (uri, entry)
        self._flush()



def prepare_ddp_model(model: Any) -> Any:
    """The rank's model on its device, wrapped in DDP when the run has several ranks, with the
    options the model needs (``capsnet_core.train.ddp_options``): every train and tune rank uses this."""
    import ray.train.torch

    from capsnet_core.train import ddp_options

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(model))


def stop_error(reason: str) -> JobCancelled:
    """What a run raises when ``JobChannel.stop_reason`` says stop: past the time limit a
    ``TimeLimitReached`` (the job fails), else ``JobCancelled`` (cancel, or a lease taken over)."""
    return TimeLimitReached(reason) if reason == TIME_LIMIT_REASON else JobCancelled(reason)


def fit_or_stop(run: Callable[[], T], channel: JobChannel, lost: Callable[[Exception], str | None]) -> T:
    """``run()`` (a Ray Train or Tune fit) to its end, then why it ended: ``JobCancelled`` when
    the job record says stop (cancel requested, lease lost), whether the run raised or not;
    ``AttemptLost`` when it raised and ``lost(exc)`` names an infrastructure loss; else what it
    raised, or what it returned."""
    try:
        outcome = run()
    except Exception as exc:
        reason = channel.stop_reason()
        if reason is not None:
            raise stop_error(reason) from exc
        why = lost(exc)
        if why is not None:
            raise AttemptLost(why) from exc
        raise
    reason = channel.stop_reason()
    if reason is not None:
        raise stop_error(reason)
    return outcome
