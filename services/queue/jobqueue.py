"""The Redis job queue: at-least-once delivery, never losing a job, with fenced workers. Every
multi-key update is one Lua script (``services/queue/queue.lua``); lifecycle, leases, retries and
dead letters: docs/architecture.md.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import redis

from services.queue import parsing, selection
from services.queue.attempt import AttemptWriter, read_record
from services.queue.attempt import dumps as _dumps
from services.queue.causes import FailureCause
from services.queue.errors import (
    MAX_ERROR_CHARS,
    MAX_TRACEBACK_CHARS,
    CapacityError,
    IdempotencyConflict,
    JobNotFound,
    JobStateError,
    truncate_head,
    truncate_tail,
)
from services.queue.events import EventLog
from services.queue.job import AnySpec, ClaimedJob, JobRecord, PruneBatch, new_job_id
from services.queue.keys import Keys
from services.queue.registry import WorkerRegistry, server_time
from services.queue.replication import NotReplicated, run_replicated
from services.queue.scripts import Scripts
from services.queue.stats import QueueStats
from services.spec.errors import SpecError
from services.spec.gpus import fits, gpu_text
from services.spec.jobspec import TuneSpec, parse_spec

LeaseStatus = Literal["ok", "lost", "cancel_requested"]

_SUBMIT_CHUNK = 500

# What one submit may carry: a job's hash is read whole by claim (HGETALL), and one 32 MB
# field there blocked all of Redis for seconds (failure text is cut likewise: services.queue.errors).
MAX_SPEC_BYTES = 64 * 1024
MAX_IDEMPOTENCY_KEY_CHARS = 200


# Every value read from Redis goes through these total parsers (services.queue.parsing): junk
# becomes None or a default, never an exception.
_s = parsing.text
_f = parsing.finite


class JobQueue:
    """The job queue over one Redis database and key prefix. Thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None, lease_seconds: float = 30.0, *,
                 backoff_base: float = 5.0, backoff_max: float = 600.0, events_maxlen: int = 5000,
                 dead_letter_max: int = 10_000, notify_max: int = 1000, events_ttl: int = 14 * 86400,
                 idempotency_ttl: int = 7 * 86400, housekeeping_limit: int = 20,
                 max_spec_bytes: int = MAX_SPEC_BYTES, wait_replicas: int = 0, wait_timeout_ms: int = 1000) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self.client = client
        self.keys = keys or Keys()
        self.lease_seconds = float(lease_seconds)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.dead_letter_max = int(dead_letter_max)
        self.notify_max = int(notify_max)
        self.idempotency_ttl = int(idempotency_ttl)
        self.events_ttl = int(events_ttl)
        self.housekeeping_limit = int(housekeeping_limit)
        self.max_spec_bytes = int(max_spec_bytes)
        # WAIT for this many replicas before a submit or an outcome counts as done (0: off).
        self.wait_replicas = int(wait_replicas)
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.scripts = Scripts(client, self.keys, events_maxlen=events_maxlen, dead_letter_max=self.dead_letter_max,
                               notify_max=self.notify_max, events_ttl=self.events_ttl)
        self.events = EventLog(client, self.keys, maxlen=events_maxlen, scripts=self.scripts)
        self.attempts = AttemptWriter(client, self.keys, self.scripts, self.events)  # (see AttemptWriter)
        self.registry = WorkerRegistry(client, self.keys)
        self.stats = QueueStats(client, self.keys)

    @classmethod
    def from_settings(cls, settings: Any, client: redis.Redis | None = None, **kwargs: Any) -> JobQueue:
        from services.queue.connection import redis_client

        kwargs.setdefault("wait_replicas", getattr(settings, "redis_wait", 0))
        kwargs.setdefault("wait_timeout_ms", getattr(settings, "redis_wait_timeout_ms", 1000))
        return cls(client or redis_client(settings), Keys(settings.redis_prefix),
                   lease_seconds=settings.lease_seconds, **kwargs)

    # ------------------------------------------------------------------ plumbing

    def _run(self, name: str, args: Sequence[Any], now: float | None = None, client: Any = None) -> Any:
        return self.scripts.run(name, args, now=now, client=client)

    def _run_outcome(self, name: str, args: Sequence[Any]) -> Any:
        """An attempt's outcome; with ``wait_replicas``, acknowledged only once that many replicas
        have it (``NotReplicated`` otherwise: the caller records it again, which the script
        answers from its first run, so nothing happens twice)."""
        if not self.wait_replicas:
            return self._run(name, args)
        return run_replicated(self.client, self.wait_replicas, self.wait_timeout_ms,
                              lambda pipe: self._run(name, args, client=pipe))

    def _header(self) -> tuple[bytes, ...]:
        return self.scripts.header()

    def _queue_submit(self, pipe: Any, header: tuple[bytes, ...], args: Sequence[Any]) -> None:
        """The submit script queued on a pipeline (the hot path of submit_many)."""
        self.scripts.queue_on(pipe, "submit", header, args)

    # ------------------------------------------------------------------ submit

    def submit(self, spec: AnySpec | Mapping[str, Any] | str, idempotency_key: str | None = None,
               *, check_capacity: bool = True) -> JobRecord:
        """Validate and enqueue a job. With an ``idempotency_key`` already used (within
        ``idempotency_ttl``) for the same spec, returns the existing job and enqueues nothing.

        Raises ``SpecError`` for an invalid spec (or one over ``max_spec_bytes``, or a key over
        ``MAX_IDEMPOTENCY_KEY_CHARS``), ``IdempotencyConflict`` when the key names a job with a
        different spec, and ``CapacityError`` when live workers are registered and none of them
        could ever fit the job's resources.
        """
        return self.submit_many([spec], [idempotency_key], check_capacity=check_capacity)[0]

    def submit_many(self, specs: Iterable[AnySpec | Mapping[str, Any] | str],
                    idempotency_keys: Sequence[str | None] | None = None, *,
                    check_capacity: bool = True) -> list[JobRecord]:
        """Submit several jobs pipelined (each still atomic on its own), in input order.

        All specs are validated (and capacity-checked) before anything is sent. Large batches go
        in chunks of 500 per pipeline; should Redis fail midway, earlier chunks stay submitted.
        An idempotency conflict is raised after the batch, whose other jobs stay submitted."""
        parsed = [parse_spec(s) for s in specs]
        idem = list(idempotency_keys) if idempotency_keys is not None else [None] * len(parsed)
        if len(idem) != len(parsed):
            raise ValueError("idempotency_keys must match specs one to one")
        texts = self._checked_batch(parsed, idem, check_capacity)
        rows = []
        pipes = []
        header = self._header()
        ttl = str(self.idempotency_ttl).encode()
        for start in range(0, len(parsed), _SUBMIT_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for spec, key, text in zip(parsed[start:start + _SUBMIT_CHUNK], idem[start:start + _SUBMIT_CHUNK],
                                       texts[start:start + _SUBMIT_CHUNK], strict=True):
                res = spec.resources()
                self._queue_submit(pipe, header, [
                    new_job_id(), self.keys.idempotency(key) if key else b"", ttl, spec.priority,
                    gpu_text(res["gpus"]), str(res["cpus"]), spec.kind, spec.label, text,
                    str(spec.max_retries), spec.name or b"", key or b"", str(spec.max_lost),
                ])
                rows.append((spec, res, key))
            if self.wait_replicas:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            pipes.append(pipe)
        acks: list[int] = []

        def execute(pipe: Any) -> list[Any]:
            replies = pipe.execute()
            if self.wait_replicas:
                acks.append(int(replies.pop()))
            return replies

        if len(pipes) == 1:
            replies = execute(pipes[0])
        else:
            # Several chunks: a helper thread runs them in order (so FIFO follows the input order)
            # while this thread turns earlier replies into records; Redis works meanwhile.
            replies = []
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="submit") as pool:
                futures = [pool.submit(execute, p) for p in pipes]
                for future in futures:
                    replies.extend(future.result())
        out = self._submitted_records(rows, replies)
        if acks and min(acks) < self.wait_replicas:
            raise NotReplicated(min(acks), self.wait_replicas, self.wait_timeout_ms, reply=out)
        return out

    def _checked_batch(self, parsed: list[AnySpec], idem: list[str | None], check_capacity: bool) -> list[str]:
        """The specs' JSON texts, once every spec and key is within limits (and fits the cluster)."""
        texts = [spec.to_json() for spec in parsed]
        for text in texts:
            if len(text.encode()) > self.max_spec_bytes:
                raise SpecError(f"spec: {len(text.encode())} bytes of JSON, more than the {self.max_spec_bytes} "
                                f"allowed", "spec")
        for key in idem:
            if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
                raise SpecError(f"idempotency_key: at most {MAX_IDEMPOTENCY_KEY_CHARS} characters allowed "
                                f"(got {len(key)})", "idempotency_key")
        if check_capacity and parsed:
            capacity = self.cluster_capacity()
            for spec in parsed:
                self._check_capacity(spec, capacity)
        return texts

    def _submitted_records(self, rows: list[tuple[AnySpec, dict[str, Any], str | None]],
                           replies: list[Any]) -> list[JobRecord]:
        """One record per submitted job (the existing one where an idempotency key matched);
        raises the first idempotency conflict after the rest are accounted for."""
        out = []
        conflict: IdempotencyConflict | None = None
        for (spec, res, key), reply in zip(rows, replies, strict=True):
            job_id, created, created_at = _s(reply[0]), int(reply[1]), _f(reply[2])
            if created == 2:
                conflict = conflict or IdempotencyConflict(
                    f"idempotency key {key!r} already names job {job_id}, submitted with a different spec; "
                    f"use a new key, or `capsctl status {job_id}`", job_id or "")
                continue
            if not created:
                existing = self.get(job_id)  # type: ignore[arg-type]
                if existing is not None:
                    out.append(existing)
                    continue
            out.append(JobRecord(
                id=job_id, kind=spec.kind, state="queued", priority=spec.priority, spec=spec.to_dict(),  # type: ignore[arg-type]
                max_retries=spec.max_retries, max_lost=spec.max_lost, model=spec.label, name=spec.name,
                gpus=res["gpus"],
                cpus=int(res["cpus"]), created_at=created_at, updated_at=created_at, queued_at=created_at,
                transitions=[{"state": "queued", "at": created_at, "attempt": 0, "reason": "submitted"}],
                idempotency_key=key))
        if conflict is not None:
            raise conflict
        return out

    def _check_capacity(self, spec: AnySpec, capacity: Mapping[str, Any]) -> None:
        if not capacity["workers"]:
            return  # nobody registered yet: accept, a worker may join later
        need = spec.resources()
        shapes = capacity["shapes"]
        if any(fits(need["gpus"], g) and need["cpus"] <= c for g, c in shapes):
            return
        what = "gpus" if not fits(need["gpus"], capacity["max_gpus"]) else "cpus"
        hint = ""
        if isinstance(spec, TuneSpec) and what == "gpus":
            hint = "; lower gpus_per_trial or max_concurrent"
        raise CapacityError(
            f"{what}: job needs {need['gpus']} GPU(s) and {need['cpus']} CPU rank(s) but no live worker "
            f"offers that (largest: {capacity['max_gpus']:g} GPUs, {capacity['max_cpus']:g} CPUs; "
            f"cluster total {capacity['gpus']:g} GPUs on {capacity['workers']} worker(s)){hint}")

    # ------------------------------------------------------------------ worker side

    def claim(self, worker_id: str, available: Mapping[str, float] | None = None) -> ClaimedJob | None:
        """Atomically take the best job that fits ``available`` (``{"gpus": g, "cpus": c}``;
        None = any CPU job, no GPU jobs). Returns None when nothing fits. Never raises because
        of junk in the queue: it is dead-lettered and the next job is tried."""
        avail = dict(available or {})
        gpus = avail.get("gpus", 0)
        cpus = avail.get("cpus", math.inf)
        gpus_arg = "1e18" if gpus is None or gpus == math.inf else repr(float(gpus))
        cpus_arg = "1e18" if cpus is None or cpus == math.inf else repr(float(cpus))
        invalid_specs = 0
        while invalid_specs < 100:
            token = secrets.token_hex(12)
            reply = self._run("claim", [worker_id, token, gpus_arg, cpus_arg, self.lease_seconds,
                                        self.housekeeping_limit])
            if not reply:
                return None
            if isinstance(reply, int):  # one page of junk removed, nothing claimed yet: next page
                continue
            job_id, flat = _s(reply[0]), reply[1]
            h = dict(zip(flat[::2], flat[1::2], strict=True))
            record = JobRecord.from_hash(h)
            record.id = job_id or record.id
            try:
                spec = parse_spec(_s(h.get("spec")) or "")
                if spec.kind != record.kind:
                    raise SpecError(f"kind: hash says {record.kind!r} but the spec says {spec.kind!r}", "kind")
                need = spec.resources()
                if need["gpus"] != record.gpus or need["cpus"] != record.cpus:
                    raise SpecError(f"resources: hash says {record.resources} but the spec needs {need}",
                                    "resources")
            except SpecError as err:
                self._run("dead_letter_claimed", [record.id, token, f"invalid spec: {err}"])
                invalid_specs += 1
                continue
            return ClaimedJob(record.id, token, record.attempt, spec, record)
        return None

    def wait_for_work(self, timeout: float = 5.0) -> bool:
        """Block up to ``timeout`` s for a wake-up token (pushed by submit, requeue and retry
        promotion). True = something was enqueued: call ``claim``. A hint only: still claim
        periodically, since one token wakes one waiter."""
        try:
            if timeout <= 0:
                return self.client.lpop(self.keys.notify) is not None
            return self.client.blpop([self.keys.notify], timeout=timeout) is not None
        except redis.TimeoutError:
            return False

    def renew(self, job_id: str, token: str) -> LeaseStatus:
        """Extend the lease: "ok", "cancel_requested" (still held), or "lost" (the lease is gone:
        stop working on the job now)."""
        code = int(self._run("heartbeat", [job_id, token, self.lease_seconds]))
        return {0: "lost", 1: "ok", 2: "cancel_requested"}[code]  # type: ignore[return-value]

    def heartbeat(self, job_id: str, token: str) -> bool:
        """``renew`` as a bool (False = lost); kept for ``services.worker.worker``, which calls it."""
        return self.renew(job_id, token) != "lost"

    def is_cancel_requested(self, job_id: str) -> bool:
        return _s(self.client.hget(self.keys.job(job_id), "cancel_requested")) == "1"

    def report_progress(self, job_id: str, token: str, progress: Mapping[str, Any], *,
                        publish: bool = True) -> bool:
        return self.attempts.report_progress(job_id, token, progress, publish=publish)

    def set_checkpoint(self, job_id: str, token: str, uri: str, entry: Mapping[str, Any] | None = None,
                       keep: int = 3) -> bool:
        return self.attempts.set_checkpoint(job_id, token, uri, entry, keep)

    def complete(self, job_id: str, token: str, result: Any = None) -> bool:
        """running -> succeeded with a JSON result (fenced)."""
        return bool(self._run_outcome("complete", [job_id, token, _dumps(result)]))

    def fail(self, job_id: str, token: str, error: str, traceback: str = "", *, retry: bool = True,
             cause: FailureCause = FailureCause.UNKNOWN) -> bool:
        """running -> retrying (backoff) while retries are left, else failed (fenced).
        ``retry=False`` fails for good (e.g. an error no retry can fix). The error is stored cut to
        ``MAX_ERROR_CHARS`` (its head) and the traceback to ``MAX_TRACEBACK_CHARS`` (its tail);
        ``cause`` goes into the job record and the attempt's transition."""
        error = truncate_head(str(error), MAX_ERROR_CHARS)
        short = error if len(error) <= 500 else error[:497] + "..."
        code = self._run_outcome("fail", [job_id, token, error, truncate_tail(str(traceback or ""), MAX_TRACEBACK_CHARS),
                                  "1" if retry else "0", self.backoff_base, self.backoff_max, short,
                                  FailureCause(cause).value])
        return int(code) != 0

    def hand_back(self, job_id: str, token: str, reason: str,
                  cause: FailureCause = FailureCause.INFRASTRUCTURE_LOSS) -> str:
        """running -> queued at once after the attempt lost its infrastructure (its Ray node or a
        rank's process died), fenced. Like an expired lease, this counts against ``max_lost``,
        never ``max_retries``, and keeps the checkpoint to resume from. Returns ``"queued"``,
        ``"failed"`` (``max_lost`` used up), ``"cancelled"`` (a cancel was pending) or
        ``"fenced"`` (the token is stale: nothing changed)."""
        return _s(self._run_outcome("hand_back", [job_id, token, truncate_head(str(reason), 500),
                                                        FailureCause(cause).value])) or ""

    def mark_cancelled(self, job_id: str, token: str) -> bool:
        """The running worker stopped after a cancel request: running -> cancelled (fenced)."""
        return bool(self._run_outcome("mark_cancelled", [job_id, token]))

    def requeue_expired(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Handle running jobs whose lease expired before ``now`` (default: Redis time): back to
        queued while attempts are left, else failed (cancelled if a cancel was pending). Safe to
        run from many workers at once. Returns the ids handled."""
        return [_s(x) for x in self._run("requeue_expired", [limit], now=now)]  # type: ignore[misc]

    def promote_due(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Move retrying jobs whose backoff is over back to queued (``claim`` also does this)."""
        return [_s(x) for x in self._run("promote_due", [limit], now=now)]  # type: ignore[misc]

    # ------------------------------------------------------------------ retention

    def prune(self, older_than: float, limit: int = 200, dry_run: bool = False,
              now: float | None = None) -> PruneBatch:
        """One batch of retention: remove finished jobs (succeeded, failed, cancelled) that
        finished more than ``older_than`` seconds before ``now`` (default: Redis time), with their
        events, index entries and idempotency key. Active jobs are never touched. Examines at most
        ``limit`` index entries, so one call stays short; call again while ``batch.more``.
        ``dry_run`` lists the first candidates and removes nothing."""
        if older_than < 0 or limit < 1:
            raise ValueError("older_than must be >= 0 and limit >= 1")
        reply = self._run("prune", [repr(float(older_than)), int(limit), "1" if dry_run else "0"], now=now)
        examined = int(reply[0])
        return PruneBatch(job_ids=[_s(x) or "" for x in reply[1:]], examined=examined,
                          more=examined >= limit and not dry_run)

    def count_prunable(self, older_than: float, now: float | None = None) -> int:
        """How many finished jobs ``prune(older_than)`` would remove (services.queue.stats)."""
        return self.stats.count_prunable(older_than, now)

    # ------------------------------------------------------------------ user side

    def cancel(self, job_id: str) -> str:
        """queued/retrying -> cancelled (returns ``"cancelled"``); running -> sets cancel_requested
        for the worker to act on (returns ``"cancel_requested"``). Raises JobNotFound, or
        JobStateError for a finished job."""
        outcome = _s(self._run("cancel", [job_id]))
        if outcome == "missing":
            raise JobNotFound(f"no job {job_id}")
        if outcome not in ("cancelled", "cancel_requested"):
            raise JobStateError(f"job {job_id} already {(outcome or '').removeprefix('is:')}; nothing to cancel")
        return outcome  # type: ignore[return-value]

    def retry(self, job_id: str) -> JobRecord:
        """failed/cancelled -> queued again with a fresh retry budget (history kept)."""
        outcome = _s(self._run("retry", [job_id]))
        if outcome == "missing":
            raise JobNotFound(f"no job {job_id}")
        if outcome == "invalid":
            raise JobStateError(f"job {job_id} is malformed (no priority/resources) and cannot be requeued")
        if outcome != "requeued":
            raise JobStateError(f"job {job_id} is {outcome}; only failed or cancelled jobs can be retried")
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when there is no such job (or its key is not a hash)."""
        return read_record(self.client, self.keys, job_id)

    def resolve(self, text: str) -> str:
        """The job id a full id or unique prefix names (services.queue.selection)."""
        return selection.resolve_job_id(self.client, self.keys, text)

    def select(self, job_filter: selection.JobFilter, limit: int | None = None) -> list[JobRecord]:
        """Jobs matching a filter, newest first (services.queue.selection)."""
        return selection.select_jobs(self.client, self.keys, job_filter, limit)

    def list(self, state: str | None = None, limit: int = 50) -> list[JobRecord]:
        """Newest first; all jobs or those in one state (see ``QueueStats.list``)."""
        return self.stats.list(state, limit)

    # ------------------------------------------------------------------ read-only views
    # (services.queue.stats: totals that read junk keys as empty)

    def state_counts(self) -> dict[tuple[str, str], int]:
        """``{(state, priority): n}`` for every state and priority."""
        return self.stats.state_counts()

    def counters(self) -> dict[str, Any]:
        """Monotonic counters for metrics (see ``QueueStats.counters``)."""
        return self.stats.counters()

    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first: ``{"job_id", "reason", "at", "source"}``."""
        return self.stats.dead_letters(limit)

    def dead_letter_count(self) -> int:
        return self.stats.dead_letter_count()

    def queue_depth(self) -> dict[str, int]:
        """Entries waiting in the queue zsets per priority."""
        return self.stats.queue_depth()

    # ------------------------------------------------------------------ workers
    # (services.queue.registry: TTL'd registrations, the capacity submit checks against)

    def register_worker(self, worker_id: str, info: Mapping[str, Any], ttl: float | None = None) -> None:
        """Announce (or refresh) a live worker for ``ttl`` s (default: the lease length)."""
        self.registry.register(worker_id, info, self.lease_seconds if ttl is None else ttl)

    def unregister_worker(self, worker_id: str) -> None:
        self.registry.unregister(worker_id)

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' info dicts, sorted by id (see ``WorkerRegistry.workers``)."""
        return self.registry.workers()

    def cluster_capacity(self) -> dict[str, Any]:
        """Totals published by live workers (see ``WorkerRegistry.cluster_capacity``)."""
        return self.registry.cluster_capacity()

    def _server_time(self) -> float:
        return server_time(self.client)
