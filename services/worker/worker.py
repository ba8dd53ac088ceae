"""``capsctl worker``: the long-running consumer of the job queue.

One worker runs one job at a time as a Ray driver: it admits a job only when Ray has the
resources it asks for, heartbeats its lease while it runs and records the outcome fenced by the
lease token. What happens when the worker, a Ray node or Redis goes away is in
docs/architecture.md, *The worker*.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from services.artifacts import is_uri
from services.config import Settings, ray_node_env, ray_worker_env
from services.metrics.http import start_metrics_server
from services.metrics.queue import QueueCollector, known_job_labels
from services.metrics.redis_state import RedisHealthCollector
from services.metrics.worker import default_worker_metrics
from services.queue.causes import FailureCause
from services.queue.connection import redis_client
from services.queue.job import ClaimedJob
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.redis_health import PolicyWatch, check_policy
from services.queue.redis_retry import RedisRetry, RedisUnavailable, no_retry_client_kwargs
from services.queue.retention import Pruner
from services.queue.states import JobState
from services.runs.error_text import full_traceback, root_cause
from services.runs.runtime import AttemptLost, JobCancelled, JobContext, JobRejected, TimeLimitReached
from services.spec.results import to_document
from services.worker.admission import AdmissionLock, free_of, reserved
from services.worker.outcome import AttemptOutcome
from services.worker.runners import runner_for
from services.worker.store_health import StoreHealth, StoreMonitor, storage_fault

log = logging.getLogger("capsctl.worker")


# How often a worker waiting for the admission lock tries again, and how often the holder looks
# at Ray for its job's reservation.
ADMISSION_RETRY_S = 0.25
ADMISSION_POLL_S = 0.2
# The admission lock's TTL, renewed by its holder on every poll: a worker that dies while
# admitting blocks the other workers' admissions for at most this long.
ADMISSION_TTL_S = 10.0
ADMISSION_BUSY = object()


@dataclass
class Admission:
    """A job claimed under the admission lock, which is still held (``token``)."""

    job: ClaimedJob
    token: str
    free: dict[str, float]  # the cluster's free resources read for the claim
    groups_before: set[str]  # placement groups that existed before the claim
    started: float  # time.monotonic() of the claim


def failure_cause(exc: BaseException) -> FailureCause:
    """The typed cause of a run that raised and was neither cancelled, lost nor a storage fault."""
    if isinstance(exc, JobRejected):
        return FailureCause.USER_ERROR
    if isinstance(exc, redis.RedisError):
        return FailureCause.REDIS
    return FailureCause.UNKNOWN


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, *, worker_id: str | None = None, metrics_port: int | None = None,
                 num_cpus: int | None = None, poll_seconds: float = 2.0,
                 admission_timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self.num_cpus = num_cpus
        self.poll_seconds = poll_seconds
        self.queue = JobQueue(redis_client(settings, **no_retry_client_kwargs()), Keys(settings.redis_prefix),
                              lease_seconds=settings.lease_seconds, wait_replicas=settings.redis_wait,
                              wait_timeout_ms=settings.redis_wait_timeout_ms)
        self.pruner = Pruner(self.queue, settings.retention_days)
        # Held from reading the free resources until the claimed job's resources are reserved
        # (at most admission_timeout_s); its TTL frees it should this worker die meanwhile.
        self.admission_timeout_s = admission_timeout_s
        self.admission = AdmissionLock(self.queue.client, self.queue.keys, ttl_seconds=ADMISSION_TTL_S)
        self.redis = RedisRetry(log)
        self.metrics = default_worker_metrics()
        self.metrics_url = ""
        self._stop = threading.Event()
        self._current: ClaimedJob | None = None
        self._started = time.time()
        self._collectors: list[Any] = []
        # Probed at start and before each claim: a read-only or full store would fail every job.
        self.store = StoreMonitor(settings.artifacts, settings.artifacts_min_free_bytes, on_change=self._store_changed)
        self.policy_watch = PolicyWatch(self.queue.client, log)  # an evicting Redis: loud, every few minutes

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop claiming; the current job (if any) runs to its end. A second request exits now."""
        if self._stop.is_set():
            log.warning("second stop request: exiting now; the job's lease will expire and it resumes elsewhere")
            os._exit(1)
        self._stop.set()

    def start(self) -> None:
        import ray

        # Before Ray: an evicting Redis under CAPSNET_REQUIRE_NOEVICTION=1 refuses at once
        # (EvictionPolicyRefused); otherwise it is a warning, repeated every few minutes.
        self.policy_watch.health = self.redis.call(
            check_policy, self.queue.client, log, require_noeviction=self.settings.require_noeviction,
            what="reading the Redis eviction policy", stop=self._stop)
        if not ray.is_initialized():
            env_vars = ray_worker_env(os.environ)  # CAPSNET_*, NCCL_*, TORCH_NCCL_*
            if self.settings.data_dir is not None:
                env_vars["CAPSNET_DATA_DIR"] = str(self.settings.data_dir)
            if not self.settings.ray_address:  # the local Ray this starts: ranks at normal priority
                os.environ.update(ray_node_env())
            ray.init(address=self.settings.ray_address or None,
                     num_cpus=None if self.settings.ray_address else self.num_cpus,
                     runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING,
                     configure_logging=False, log_to_driver=False)
        if not self._collectors:  # this worker's queue and Redis views, until run() ends
            from prometheus_client import REGISTRY

            self._collectors = [QueueCollector(self.queue, zero_fill=known_job_labels()),
                                RedisHealthCollector(self.queue.client)]
            for collector in self._collectors:
                REGISTRY.register(collector)
        addr = self.settings.metrics_addr
        port = start_metrics_server(self.metrics_port, addr=addr)
        # a wildcard bind is reached by the host's name; otherwise by the address it is bound to
        host = socket.gethostname() if ipaddress.ip_address(addr).is_unspecified else addr
        self.metrics_url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
        self.metrics_port = port
        self.store.check(fresh=True)  # creates a missing local store folder; a bad store is reported, not fatal
        # A worker started while Redis is down waits for it (SIGTERM still stops it).
        self.redis.call(self._publish, what="registering the worker", stop=self._stop)
        self.record_pending_results()
        log.info("worker %s ready; metrics at %s", self.worker_id, self.metrics_url)

    def _resources(self) -> tuple[dict[str, float], dict[str, float]]:
        import ray

        total, available = ray.cluster_resources(), ray.available_resources()
        self.metrics.set_cluster_resources(total, available)
        return total, available

    def _publish(self) -> None:
        total, available = self._resources()
        current = self._current
        self.queue.register_worker(self.worker_id, {
            "hostname": socket.gethostname(), "pid": os.getpid(), "started_at": self._started,
            "resources": {"gpus": total.get("GPU", 0), "cpus": total.get("CPU", 0)},
            "available": {"gpus": available.get("GPU", 0), "cpus": available.get("CPU", 0)},
            "current_job": current.job_id if current else None, "metrics_url": self.metrics_url,
            "ray_address": self.settings.ray_address or "local", "health": self.store.status,
        }, ttl=max(3 * self.settings.heartbeat_seconds, 10))

    def run(self, max_jobs: int | None = None, idle_exit_s: float | None = None) -> None:
        """Serve jobs until stopped (SIGTERM/SIGINT), `max_jobs` jobs are done, or idle too long.

        A Redis outage is waited out, never a reason to exit."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        try:
            self.start()
        except RedisUnavailable:
            log.info("stopped before Redis answered")
            self._unregister_collectors()
            return
        done, idle_since, last_publish, published_status = 0, time.monotonic(), 0.0, ""
        try:
            while not self._stop.is_set() and (max_jobs is None or done < max_jobs):
                store_ok = self.store.check().ok  # no claim while the store is unfit: its jobs would all fail
                if (time.monotonic() - last_publish >= self.settings.heartbeat_seconds
                        or published_status != self.store.status):
                    self.redis.call(self._publish, what="refreshing the worker registration", stop=self._stop)
                    last_publish, published_status = time.monotonic(), self.store.status
                    self.policy_watch.maybe_check()
                admitted = self._admit() if store_ok else None
                if admitted is ADMISSION_BUSY:  # another worker is admitting a job: our turn soon
                    self._stop.wait(ADMISSION_RETRY_S)
                    continue
                if admitted is None:
                    self.pruner.maybe_run()
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        log.info("idle for %.0f s: exiting", idle_exit_s)
                        break
                    if not store_ok:  # retry later; take no wake-up token a healthy worker could use
                        self._stop.wait(self.poll_seconds)
                        continue
                    self.redis.call(lambda: self.queue.wait_for_work(timeout=self.poll_seconds),
                                    what="waiting for work", stop=self._stop)
                    continue
                self.execute(admitted.job, admitted)
                done += 1
                idle_since = time.monotonic()
        except RedisUnavailable:
            log.info("stop requested while Redis was unavailable")
        finally:
            try:  # the registration expires by itself: do not hang an exit on a dead Redis
                self.redis.call(self.queue.unregister_worker, self.worker_id, what="unregistering the worker",
                                timeout=5)
            except RedisUnavailable as exc:
                log.warning("could not unregister (%s); the registration expires by itself", exc)
            self._unregister_collectors()

    def _unregister_collectors(self) -> None:
        from prometheus_client import REGISTRY

        for collector in self._collectors:
            REGISTRY.unregister(collector)
        self._collectors = []

    def _store_changed(self, health: StoreHealth) -> None:
        """One log line per change of the store's verdict (not per retry), and the metric."""
        self.metrics.set_artifacts_health(health.ok, health.free_bytes)
        if health.ok:
            log.info("artifact store %s is writable; claiming jobs", self.settings.artifacts)
        else:
            log.warning("artifact store %s: %s; claiming no job until it is fixed (probing every %g s)",
                        self.settings.artifacts, health.problem, self.poll_seconds)

    # ------------------------------------------------------------------ admission

    def _placement_groups(self) -> dict[str, dict[str, Any]]:
        import ray.util

        return dict(ray.util.placement_group_table())

    def _admit(self) -> Admission | None | object:
        """Under the admission lock, claim the best job that fits the cluster's free resources.

        Returns the ``Admission`` (the lock still held: ``_hold_admission`` lets it go once the
        job's resources are reserved), None when nothing fits (lock released), or
        ``ADMISSION_BUSY`` when another worker holds the lock."""
        token = self.redis.call(self.admission.acquire, what="taking the admission lock", stop=self._stop)
        if token is None:
            return ADMISSION_BUSY
        job = None
        try:
            groups_before = self._placement_groups()
            total, available = self._resources()
            free = free_of(available, total, groups_before.values())
            job = self.redis.call(self.queue.claim, self.worker_id, free, what="claiming a job", stop=self._stop)
        finally:
            if job is None:
                self.redis.attempt(self.admission.release, token, what="releasing the admission lock")
        if job is None:
            return None
        return Admission(job, token, free, set(groups_before), time.monotonic())

    def _hold_admission(self, admission: Admission, done: threading.Event) -> None:
        """Keep the admission lock until the job's resources are reserved in Ray, the attempt
        ends, or the timeout passes; then release it and say so in the job's events."""
        job, need = admission.job, admission.job.spec.resources()
        deadline = admission.started + self.admission_timeout_s
        outcome = "ended"
        try:
            while not done.wait(ADMISSION_POLL_S):
                try:
                    groups = self._placement_groups()
                    total, available = self._resources()
                except Exception:  # Ray busy or going away: the deadline still bounds the wait
                    log.exception("admission of %s: reading Ray's resources failed", job.job_id)
                    groups, total, available = {}, {}, {}
                new_groups = [g for pg_id, g in groups.items() if pg_id not in admission.groups_before]
                if available and reserved(need, admission.free, free_of(available, total, groups.values()),
                                          new_groups):
                    outcome = "reserved"
                    break
                if time.monotonic() >= deadline:
                    outcome = "timeout"
                    break
                self.redis.attempt(self.admission.renew, admission.token, what="renewing the admission lock")
        finally:
            self.redis.attempt(self.admission.release, admission.token, what="releasing the admission lock")
        seconds = time.monotonic() - admission.started
        self.metrics.observe_admission(outcome, seconds)
        if outcome == "reserved":
            self._log_event(job, f"resources reserved in Ray {seconds:.1f} s after the claim "
                            f"({need['gpus']:g} GPU(s), {need['cpus']:g} CPU(s))", admission_seconds=round(seconds, 3))
        elif outcome == "timeout":
            self._log_event(job, f"resources not seen reserved in Ray within {self.admission_timeout_s:g} s; "
                            f"other jobs may be admitted meanwhile", level="warning")

    # ------------------------------------------------------------------ one job

    def _context(self, job: ClaimedJob) -> JobContext:
        return JobContext(job_id=job.job_id, lease_token=job.token, attempt=job.attempt,
                          redis_url=self.settings.redis_url, redis_prefix=self.settings.redis_prefix,
                          artifacts=str(self.settings.artifacts),
                          data_dir=str(self.settings.data_dir) if self.settings.data_dir else None,
                          resume_checkpoint=job.checkpoint, started_at=time.time(),
                          niceness=os.getpriority(os.PRIO_PROCESS, 0),
                          deadline=time.time() + limit if (limit := getattr(job.spec, "time_limit_s", None)) else None,
                          max_params=self.settings.max_params, eval_roots=tuple(self.settings.eval_roots))

    def _heartbeat_loop(self, job: ClaimedJob, done: threading.Event, lost: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_seconds):
            try:
                # Through an outage this waits for Redis; once it answers, the first heartbeat
                # tells whether the lease survived (nobody can requeue the job while Redis is down).
                alive = self.redis.call(self.queue.heartbeat, job.job_id, job.token,
                                        what=f"renewing the lease of {job.job_id}", stop=done)
                if not alive:
                    log.warning("job %s: lease lost; a newer attempt owns it now", job.job_id)
                    lost.set()
                    return
                self.redis.attempt(self._publish, what="refreshing the worker registration")
                self.policy_watch.maybe_check()  # long jobs too: the policy may change under us
            except RedisUnavailable:
                return  # the job ended while Redis was away
            except Exception:  # not an outage (junk in Redis, a bug): keep trying until the lease expires
                log.exception("heartbeat for %s failed", job.job_id)

    def _metrics_loop(self, job: ClaimedJob, done: threading.Event) -> None:
        """Feed the job's progress events into this worker's Prometheus gauges, until the attempt
        ends and then once more: an eval job's only progress event comes right before its end."""
        model = job.record.model or getattr(job.spec, "model", "") or job.spec.kind
        cursor: str | None = None
        what = f"following the events of {job.job_id}"
        while not done.is_set():
            try:
                if cursor is None:
                    cursor = self.redis.call(self.queue.events.last_id, job.job_id, what=what, stop=done)
                batch = self.redis.call(self.queue.events.read, job.job_id, cursor, block_ms=1000,
                                        what=what, stop=done)
                cursor, model = self._feed_metrics(job, batch, cursor, model)
            except RedisUnavailable:
                return
            except Exception:
                log.exception("metrics follower for %s failed", job.job_id)
                done.wait(1.0)
        if cursor is not None:
            batch = self.redis.attempt(self.queue.events.read, job.job_id, cursor, what=what, default=[])
            try:
                self._feed_metrics(job, batch, cursor, model)
            except Exception:
                log.exception("metrics follower for %s failed", job.job_id)

    def _feed_metrics(self, job: ClaimedJob, batch: list[tuple[str, dict[str, Any]]], cursor: str,
                      model: str) -> tuple[str, str]:
        for entry_id, event in batch:
            cursor = entry_id
            data = event["data"] if isinstance(event["data"], dict) else {}
            if event["type"] == "progress" and data.get("type") == "trial":
                self.metrics.trials.observe(job.job_id, data)  # one series per trial, not the job's
            elif event["type"] == "progress":
                if job.spec.kind == "eval" and isinstance(data.get("model"), str):
                    model = data["model"]  # an eval learns its model from the checkpoint
                self.metrics.training.observe(job.job_id, model, data)
            elif event["type"] == "log":
                if "startup_seconds" in data:
                    self.metrics.observe_startup(data["startup_seconds"])
                if isinstance(data.get("events_dropped"), int):  # rank 0's count after an outage
                    self.metrics.count_dropped_events(data["events_dropped"])
        return cursor, model

    def _log_event(self, job: ClaimedJob, message: str, **extra: Any) -> None:
        """A job log event that may be dropped (counted) while Redis is away."""
        # A refused append (stale lease token) returns None too: either way nothing was written.
        if self.redis.attempt(self.queue.events.log, job.job_id, message, what=f"logging for {job.job_id}",
                              default=None, lease_token=job.token, **extra) is None:
            self.metrics.count_dropped_events()
            log.info("job %s: event dropped (Redis unavailable): %s", job.job_id, message)

    # ------------------------------------------------------------------ results kept through outages

    def _pending_path(self, job_id: str, attempt: int) -> Path | None:
        if is_uri(self.settings.artifacts):
            return None  # remote storage: the result is kept in memory only
        return Path(self.settings.artifacts) / job_id / f"pending-result-{attempt}.json"

    def _keep_result(self, job: ClaimedJob, result: Any) -> Path | None:
        """Write the result next to the checkpoints before recording it, so that a worker that
        dies (or is stopped) while Redis is away does not lose it."""
        path = self._pending_path(job.job_id, job.attempt)
        if path is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"job_id": job.job_id, "attempt": job.attempt, "lease_token": job.token,
                                       "finished_at": time.time(), "result": result}, default=str))
            tmp.replace(path)
            return path
        except OSError as exc:
            log.warning("job %s: could not keep the result in %s (%s); it is kept in memory", job.job_id, path, exc)
            return None

    def _record_result(self, job_id: str, attempt: int, token: str, result: Any) -> bool:
        """``complete`` fenced by the attempt's lease token, waiting for Redis as long as it takes
        (or until stop). True = this attempt's success is recorded; False = the result is stale
        (a newer attempt holds the lease, or the job ended otherwise) and was discarded."""
        if self.redis.call(self.queue.complete, job_id, token, result, what=f"recording the result of {job_id}",
                           stop=self._stop):
            return True
        record = self.redis.call(self.queue.get, job_id, what=f"reading {job_id}", stop=self._stop)
        if record is not None and record.state == JobState.SUCCEEDED and any(
                t.get("state") == "succeeded" and t.get("attempt") == attempt
                for t in record.transitions if isinstance(t, dict)):
            return True  # our complete went through but its reply was lost with the connection
        log.warning("job %s attempt %d: result discarded: the job is %s (attempt %s) now, and only the attempt "
                    "holding the lease may record an outcome", job_id, attempt,
                    record.state if record else "gone", record.attempt if record else "-")
        return False

    def record_pending_results(self) -> None:
        """Record the results a previous worker process kept on disk but never got into Redis."""
        artifacts = Path(self.settings.artifacts)
        if self._pending_path("x", 0) is None or not artifacts.is_dir():
            return
        for path in sorted(artifacts.glob("*/pending-result-*.json")):
            try:
                kept = json.loads(path.read_text())
                job_id, attempt, token = str(kept["job_id"]), int(kept["attempt"]), str(kept["lease_token"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable kept result %s: %s", path, exc)
                continue
            if self._record_result(job_id, attempt, token, kept.get("result")):
                log.info("job %s attempt %d: kept result recorded from %s", job_id, attempt, path)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a read-only store: recording twice is fenced, so it is harmless
                log.warning("could not remove the kept result %s: %s", path, exc)

    # ------------------------------------------------------------------ run one job

    def execute(self, job: ClaimedJob, admission: Admission | None = None) -> AttemptOutcome:
        """Run one claimed job to an outcome: succeeded, failed (maybe retried), cancelled or lost.
        With ``admission``, the admission lock is released once the job's resources are reserved."""
        self._current = job
        kind = job.spec.kind
        record = job.record
        if record.queued_at:
            self.metrics.observe_queue_wait(kind, time.time() - record.queued_at)
        done, lost = threading.Event(), threading.Event()
        threads = [threading.Thread(target=self._heartbeat_loop, args=(job, done, lost), daemon=True),
                   threading.Thread(target=self._metrics_loop, args=(job, done), daemon=True)]
        if admission is not None:
            threads.append(threading.Thread(target=self._hold_admission, args=(admission, done), daemon=True))
        for t in threads:
            t.start()
        ctx = self._context(job)
        self._log_event(job, f"attempt {job.attempt} started on worker {self.worker_id}"
                        + (f", resuming from {job.checkpoint}" if job.checkpoint else ""), worker=self.worker_id)
        started = time.monotonic()
        outcome = AttemptOutcome.SUCCEEDED
        try:
            try:
                result = runner_for(kind)(job.spec, ctx, self.queue)
            except Exception as exc:
                outcome = self._record_error(job, exc, lost)
            else:
                # Even when the heartbeat saw the lease go, try: the token fence decides.
                document = to_document(result)
                kept = self._keep_result(job, document)
                if not self._record_result(job.job_id, job.attempt, job.token, document):
                    outcome = AttemptOutcome.LOST
                if kept is not None:
                    kept.unlink(missing_ok=True)
        except RedisUnavailable:
            # Stop requested while Redis was away: the kept result file (if any) is recorded by the
            # next worker to start; without one the lease expires and the job is resumed.
            outcome = AttemptOutcome.LOST
            log.warning("job %s attempt %d: stopped before Redis answered; outcome not recorded",
                        job.job_id, job.attempt)
        finally:
            done.set()
            for t in threads:
                t.join(timeout=5)
            self.metrics.observe_run_duration(kind, outcome, time.monotonic() - started)
            self.metrics.training.remove(job.job_id)
            self.metrics.trials.remove(job.job_id)
            self._current = None
        log.info("job %s attempt %d: %s", job.job_id, job.attempt, outcome)
        return outcome

    def _record_error(self, job: ClaimedJob, exc: Exception, lost: threading.Event) -> AttemptOutcome:
        """cancelled / lost / failed (fenced) for a run that raised; waits for Redis like a result."""
        if self.redis.call(self.queue.is_cancel_requested, job.job_id, what=f"reading {job.job_id}", stop=self._stop):
            self.redis.call(self.queue.mark_cancelled, job.job_id, job.token, what=f"cancelling {job.job_id}",
                            stop=self._stop)
            self.metrics.count_failure(job.spec.kind, FailureCause.CANCELLED)
            return AttemptOutcome.CANCELLED
        if isinstance(exc, TimeLimitReached) and not lost.is_set():
            limit = job.spec.time_limit_s
            message = f"time limit: the attempt ran past --time-limit {limit} s and was stopped"
            self.redis.call(self.queue.fail, job.job_id, job.token, message, "", retry=False,
                            cause=FailureCause.TIME_LIMIT, what=f"recording the time limit of {job.job_id}",
                            stop=self._stop)
            self.metrics.count_failure(job.spec.kind, FailureCause.TIME_LIMIT)
            log.warning("job %s attempt %d: %s", job.job_id, job.attempt, message)
            return AttemptOutcome.FAILED
        if isinstance(exc, JobCancelled) or lost.is_set():
            # a newer attempt owns the job: record nothing of ours
            self._log_event(job, f"attempt {job.attempt} stopped: {exc}", level="warning")
            return AttemptOutcome.LOST
        cause = root_cause(exc)  # the rank's or controller's own error, not Ray's wrapper
        storage_why = None if isinstance(exc, AttemptLost) else storage_fault(cause, self.store)
        lost_why = str(exc) if isinstance(exc, AttemptLost) else storage_why
        if lost_why is not None:
            # not the job's fault (a lost node, a full or read-only store): back to the queue now
            # (max_lost), not after the lease expires
            self._log_event(job, f"attempt {job.attempt} lost its infrastructure: {lost_why}", level="warning",
                            infrastructure_lost=lost_why)
            lost_cause = FailureCause.STORAGE if storage_why is not None else FailureCause.INFRASTRUCTURE_LOSS
            state = self.redis.call(self.queue.hand_back, job.job_id, job.token, lost_why, lost_cause,
                                    what=f"handing back {job.job_id}", stop=self._stop)
            self.metrics.count_failure(job.spec.kind, lost_cause)
            log.warning("job %s attempt %d lost its infrastructure (%s): %s", job.job_id, job.attempt, lost_why,
                        "requeued" if state == "queued" else state)
            return AttemptOutcome.LOST
        message = cause.line()
        failure = failure_cause(exc)
        self.redis.call(self.queue.fail, job.job_id, job.token, message, full_traceback(exc),
                        retry=not isinstance(exc, JobRejected),  # a refused input stays refused
                        cause=failure, what=f"recording the failure of {job.job_id}", stop=self._stop)
        self.metrics.count_failure(job.spec.kind, failure)
        log.warning("job %s attempt %d failed: %s", job.job_id, job.attempt, message)
        return AttemptOutcome.FAILED
