"""``capsctl worker``: the long-running consumer of the job queue.

One worker process runs one job at a time, as a Ray driver: it claims a job only when the
Ray cluster currently has the GPUs/CPUs the job asks for (so waiting jobs wait in Redis,
visible to every worker, not inside Ray), heartbeats the job's lease while it runs, and
records the outcome with the lease token (a worker that lost its lease can't overwrite a
newer attempt). Several workers may run against one queue and one Ray cluster.

If the worker dies (SIGKILL, machine gone), Ray tears down its runs (their driver is gone),
the lease expires, and another worker re-claims the job, which resumes from its last
checkpoint (see ``ray_train``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback

from . import metrics as svc_metrics
from .config import Settings, ray_node_env, redis_client
from .keys import Keys
from .queue import ClaimedJob, JobQueue
from .ray_train import JobCancelled, JobContext, run_eval_job, run_train_job

log = logging.getLogger("capsctl.worker")


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, *, worker_id: str | None = None, metrics_port: int | None = None,
                 num_cpus: int | None = None, poll_seconds: float = 2.0) -> None:
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self.num_cpus = num_cpus
        self.poll_seconds = poll_seconds
        self.queue = JobQueue(redis_client(settings), Keys(settings.redis_prefix),
                              lease_seconds=settings.lease_seconds)
        self.metrics = svc_metrics.default_worker_metrics()
        self.metrics_url = ""
        self._stop = threading.Event()
        self._current: ClaimedJob | None = None
        self._started = time.time()
        self._collector_registered = False

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop claiming; the current job (if any) runs to its end. A second request exits now."""
        if self._stop.is_set():
            log.warning("second stop request: exiting now; the job's lease will expire and it resumes elsewhere")
            os._exit(1)
        self._stop.set()

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            env_vars = {k: v for k, v in os.environ.items()
                        if k.startswith("CAPSNET_") and k not in ("CAPSNET_METRICS_PORT",)}
            if self.settings.data_dir is not None:
                env_vars["CAPSNET_DATA_DIR"] = str(self.settings.data_dir)
            if not self.settings.ray_address:  # the local Ray this starts: ranks at normal priority
                os.environ.update(ray_node_env())
            ray.init(address=self.settings.ray_address or None,
                     num_cpus=None if self.settings.ray_address else self.num_cpus,
                     runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING,
                     configure_logging=False, log_to_driver=False)
        if not self._collector_registered:
            from prometheus_client import REGISTRY

            try:
                REGISTRY.register(svc_metrics.QueueCollector(self.queue, zero_fill=svc_metrics.known_job_labels()))
            except ValueError:
                pass  # already registered in this process (a second Worker in tests)
            self._collector_registered = True
        port = svc_metrics.start_metrics_server(self.metrics_port)
        self.metrics_url = f"http://{socket.gethostname()}:{port}/metrics"
        self.metrics_port = port
        if not self.settings.artifacts.as_posix().startswith(("s3:", "gs:", "abfs:", "hdfs:")):
            os.makedirs(self.settings.artifacts, exist_ok=True)
        self._publish()
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
            "ray_address": self.settings.ray_address or "local",
        }, ttl=max(3 * self.settings.heartbeat_seconds, 10))

    def run(self, max_jobs: int | None = None, idle_exit_s: float | None = None) -> None:
        """Serve jobs until stopped (SIGTERM/SIGINT), `max_jobs` jobs are done, or idle too long."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        self.start()
        done, idle_since, last_publish = 0, time.monotonic(), 0.0
        try:
            while not self._stop.is_set() and (max_jobs is None or done < max_jobs):
                if time.monotonic() - last_publish >= self.settings.heartbeat_seconds:
                    self._publish()
                    last_publish = time.monotonic()
                _, available = self._resources()
                job = self.queue.claim(self.worker_id, {"gpus": available.get("GPU", 0),
                                                        "cpus": available.get("CPU", 0)})
                if job is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        log.info("idle for %.0f s: exiting", idle_exit_s)
                        break
                    self.queue.wait_for_work(timeout=self.poll_seconds)
                    continue
                self.execute(job)
                done += 1
                idle_since = time.monotonic()
        finally:
            self.queue.unregister_worker(self.worker_id)

    # ------------------------------------------------------------------ one job

    def _context(self, job: ClaimedJob) -> JobContext:
        return JobContext(job_id=job.job_id, lease_token=job.token, attempt=job.attempt,
                          redis_url=self.settings.redis_url, redis_prefix=self.settings.redis_prefix,
                          artifacts=str(self.settings.artifacts),
                          data_dir=str(self.settings.data_dir) if self.settings.data_dir else None,
                          resume_checkpoint=job.checkpoint, started_at=time.time())

    def _heartbeat_loop(self, job: ClaimedJob, done: threading.Event, lost: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_seconds):
            try:
                if not self.queue.heartbeat(job.job_id, job.token):
                    log.warning("job %s: lease lost; a newer attempt owns it now", job.job_id)
                    lost.set()
                    return
                self._publish()
            except Exception:  # Redis blip: keep trying until the lease really expires
                log.exception("heartbeat for %s failed", job.job_id)

    def _metrics_loop(self, job: ClaimedJob, done: threading.Event) -> None:
        """Feed the job's progress events into this worker's Prometheus gauges."""
        model = job.record.model or getattr(job.spec, "model", "") or job.spec.kind
        cursor = self.queue.events.last_id(job.job_id)
        while not done.is_set():
            try:
                for entry_id, event in self.queue.events.read(job.job_id, cursor, block_ms=1000):
                    cursor = entry_id
                    if event["type"] == "progress":
                        self.metrics.training.observe(job.job_id, model, event["data"])
                    elif event["type"] == "log" and "startup_seconds" in event["data"]:
                        self.metrics.observe_startup(event["data"]["startup_seconds"])
            except Exception:
                log.exception("metrics follower for %s failed", job.job_id)
                done.wait(1.0)

    def execute(self, job: ClaimedJob) -> str:
        """Run one claimed job to an outcome: succeeded, failed (maybe retried), cancelled or lost."""
        self._current = job
        kind = job.spec.kind
        record = job.record
        if record.queued_at:
            self.metrics.observe_queue_wait(kind, time.time() - record.queued_at)
        done, lost = threading.Event(), threading.Event()
        threads = [threading.Thread(target=self._heartbeat_loop, args=(job, done, lost), daemon=True),
                   threading.Thread(target=self._metrics_loop, args=(job, done), daemon=True)]
        for t in threads:
            t.start()
        ctx = self._context(job)
        events = self.queue.events
        events.log(job.job_id, f"attempt {job.attempt} started on worker {self.worker_id}"
                   + (f", resuming from {job.checkpoint}" if job.checkpoint else ""), worker=self.worker_id)
        started = time.monotonic()
        outcome = "succeeded"
        try:
            if kind == "train":
                result = run_train_job(job.spec, ctx)
            elif kind == "eval":
                result = run_eval_job(job.spec, ctx, self.queue)
            elif kind == "tune":
                from .ray_tune import run_tune_job

                result = run_tune_job(job.spec, ctx, self.queue)
            else:  # claim validated the spec, so this is a programming error
                raise ValueError(f"unknown job kind {kind!r}")
            if lost.is_set() or not self.queue.complete(job.job_id, job.token, result):
                outcome = "lost"
        except Exception as exc:
            if self.queue.is_cancel_requested(job.job_id):
                outcome = "cancelled"
                self.queue.mark_cancelled(job.job_id, job.token)
            elif isinstance(exc, JobCancelled) or lost.is_set():
                outcome = "lost"  # a newer attempt owns the job: record nothing of ours
                events.log(job.job_id, f"attempt {job.attempt} stopped: {exc}", level="warning")
            else:
                outcome = "failed"
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                self.queue.fail(job.job_id, job.token, message, traceback.format_exc())
                log.warning("job %s attempt %d failed: %s", job.job_id, job.attempt, message)
        finally:
            done.set()
            for t in threads:
                t.join(timeout=5)
            self.metrics.observe_run_duration(kind, outcome, time.monotonic() - started)
            self.metrics.training.remove(job.job_id)
            self._current = None
        log.info("job %s attempt %d: %s", job.job_id, job.attempt, outcome)
        return outcome

