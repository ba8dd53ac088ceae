"""Prometheus metrics for capsctl: the worker's own histograms and cluster gauges
(``WorkerMetrics``, which holds the live training gauges of ``TrainingMetrics``), and the list of
every name capsctl exposes. Queue state read from Redis at scrape time is
services.metrics.queue's ``QueueCollector``; the HTTP exporter is services.metrics.http; label
values are services.metrics.labels. Their public names are importable from here too.
Naming, counters and the worker's wiring: docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from services.metrics.gpu import GpuCollector, GpuSample
from services.metrics.labels import label_value
from services.metrics.queue import QueueCollector
from services.metrics.redis_state import RedisHealthCollector
from services.metrics.training import TrainingMetrics
from services.metrics.trials import TrialMetrics
from services.queue.causes import FailureCause

PREFIX = "capsnet_"

# Histogram buckets (seconds): a queue wait runs from instant to hours, a run from seconds to a day.
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
RUN_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# Seconds from a worker taking a train job to its first step: mostly Ray Train starting processes,
# 5-120 s as measured (15-17 s for 2 CPU ranks on an idle machine): buckets every 2.5-10 s there.
STARTUP_BUCKETS = (2.5, 5, 7.5, 10, 12.5, 15, 17.5, 20, 25, 30, 40, 50, 60, 90, 120, 180, 300)
ADMISSION_OUTCOMES = ("reserved", "timeout", "ended")

# What the service produces (services.spec.jobspec.KINDS; services.worker.worker's attempt outcomes): label
# values exported from 0 before their first event.
JOB_KINDS = ("train", "eval", "tune")
RUN_OUTCOMES = ("succeeded", "failed", "cancelled", "lost")
# services.queue.causes.FailureCause values: the bounded cause label of capsnet_job_failures_total.
FAILURE_CAUSES = tuple(FailureCause)
# How long a finished job's test accuracies stay on /metrics (the worker's default): two scrapes
# at Prometheus' usual 15 s interval (the deploy configs scrape workers every 5 s), so the final
# accuracy per angle, set in the job's last seconds, is always recorded.
RESULT_LINGER_SECONDS = 30.0


# --------------------------------------------------------------------------- worker metrics

class WorkerMetrics:
    """Process-local metrics of one ``capsctl worker``: queue wait, run time, Ray cluster size.

    The histograms of every kind in ``kinds`` (and of every outcome in ``RUN_OUTCOMES``) are
    exported from 0 on: without that series, ``rate()`` cannot see a worker's first claim of a
    kind, and the latency panels stay empty for a worker that ran one job.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, max_jobs: int = 32,
                 kinds: Iterable[str] = JOB_KINDS, result_linger_seconds: float = 0.0,
                 gpu_reader: Callable[[], list[GpuSample]] | None = None) -> None:
        self.queue_wait = Histogram(
            "capsnet_job_queue_wait_seconds", "Time from submit (or re-queue) to a worker claiming the job.",
            ["kind"], buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.run_duration = Histogram(
            "capsnet_job_run_duration_seconds", "Time a worker spent running a job attempt, by outcome.",
            ["kind", "outcome"], buckets=RUN_DURATION_BUCKETS, registry=registry)
        self.startup = Histogram(
            "capsnet_job_startup_seconds",
            "Time from a worker starting a train job attempt to its first training step (Ray Train's "
            "controller and rank actors, the process group, loading the data).",
            buckets=STARTUP_BUCKETS, registry=registry)
        self.admission = Histogram(
            "capsnet_job_admission_seconds",
            "Time a worker held the admission lock after claiming a job, until its resources were "
            "reserved in Ray (outcome=reserved), the wait timed out (timeout) or the attempt ended first (ended).",
            ["outcome"], buckets=STARTUP_BUCKETS, registry=registry)
        self.failures = Counter(
            "capsnet_job_failures", "Job attempts that ended without a result, by kind and typed cause "
            "(services/queue/causes.py): failed, handed back after an infrastructure loss, or cancelled.",
            ["kind", "cause"], registry=registry)
        self.cluster_gpus = Gauge("capsnet_ray_cluster_gpus", "GPUs in the Ray cluster (state=total|available).",
                                  ["state"], registry=registry)
        self.cluster_cpus = Gauge("capsnet_ray_cluster_cpus", "CPUs in the Ray cluster (state=total|available).",
                                  ["state"], registry=registry)
        self.events_dropped = Counter(
            "capsnet_events_dropped",
            "Job events (progress, logs) not written because Redis was unavailable; the job's outcome "
            "is never dropped, it waits for Redis.", registry=registry)
        self.artifacts_writable = Gauge(
            "capsnet_artifacts_writable",
            "1 while this worker's artifact store passes its probe (a small write and delete, free space at "
            "least CAPSNET_ARTIFACTS_MIN_FREE_BYTES), 0 while it does not: the worker then claims no job.",
            registry=registry)
        self.artifacts_free = Gauge("capsnet_artifacts_free_bytes", "Free space of this worker's artifact store.",
                                    registry=registry)
        self.training = TrainingMetrics(registry=registry, max_jobs=max_jobs,
                                        result_linger_seconds=result_linger_seconds)
        self.trials = TrialMetrics(registry=registry)
        self.gpus = GpuCollector(gpu_reader)  # per-device utilisation and memory, read at scrape time
        if registry is not None:
            registry.register(self.gpus)
        for outcome in ADMISSION_OUTCOMES:
            self.admission.labels(outcome)
        for kind in kinds:
            self.queue_wait.labels(label_value(kind))
            for outcome in RUN_OUTCOMES:
                self.run_duration.labels(label_value(kind), outcome)
            for cause in FAILURE_CAUSES:
                self.failures.labels(label_value(kind), cause)

    def collectors(self) -> list[Collector]:
        return [self.queue_wait, self.run_duration, self.failures, self.startup, self.admission, self.cluster_gpus,
                self.cluster_cpus, self.events_dropped, self.artifacts_writable, self.artifacts_free,
                *self.training.gauges(), *self.trials.gauges(), self.gpus]

    def observe_queue_wait(self, kind: str, seconds: float) -> None:
        self.queue_wait.labels(label_value(kind)).observe(max(0.0, float(seconds)))

    def observe_run_duration(self, kind: str, outcome: str, seconds: float) -> None:
        self.run_duration.labels(label_value(kind), label_value(outcome)).observe(max(0.0, float(seconds)))

    def count_failure(self, kind: str, cause: str) -> None:
        """One attempt ended without a result; a cause outside FAILURE_CAUSES counts as unknown."""
        self.failures.labels(label_value(kind), cause if cause in FAILURE_CAUSES else "unknown").inc()

    def count_dropped_events(self, n: int = 1) -> None:
        if n > 0:
            self.events_dropped.inc(n)

    def observe_admission(self, outcome: str, seconds: float) -> None:
        self.admission.labels(label_value(outcome)).observe(max(0.0, float(seconds)))

    def observe_startup(self, seconds: float) -> None:
        self.startup.observe(max(0.0, float(seconds)))

    def set_artifacts_health(self, writable: bool, free_bytes: int | None) -> None:
        """Record the latest probe of the artifact store (``services.worker.store_health``)."""
        self.artifacts_writable.set(1.0 if writable else 0.0)
        if free_bytes is not None:
            self.artifacts_free.set(float(free_bytes))

    def set_cluster_resources(self, total: Mapping[str, float], available: Mapping[str, float]) -> None:
        """Record ``ray.cluster_resources()`` / ``ray.available_resources()`` (missing keys count as 0)."""
        for state, resources in (("total", total), ("available", available)):
            self.cluster_gpus.labels(state).set(float(resources.get("GPU", 0) or 0))
            self.cluster_cpus.labels(state).set(float(resources.get("CPU", 0) or 0))


_default: WorkerMetrics | None = None
_default_lock = threading.Lock()


def default_worker_metrics() -> WorkerMetrics:
    """The process-wide :class:`WorkerMetrics`, registered on ``prometheus_client.REGISTRY`` on first use
    (finished jobs' test accuracies linger ``RESULT_LINGER_SECONDS``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WorkerMetrics(REGISTRY, result_linger_seconds=RESULT_LINGER_SECONDS)
        return _default


# --------------------------------------------------------------------------- introspection

def exposed_metric_names() -> set[str]:
    """Every sample name capsctl can expose (``_total``, ``_bucket``/``_sum``/``_count`` included).

    Built on a throwaway registry; used by tests to check dashboards and alert rules only use
    metrics that exist.
    """
    worker = WorkerMetrics(CollectorRegistry())
    families: list[Metric] = list(QueueCollector(_NoQueue()).describe())
    families.extend(RedisHealthCollector(None).describe())
    for collector in worker.collectors():
        families.extend(collector.describe())
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


class _NoQueue:
    def state_counts(self) -> dict:
        return {}

    def workers(self) -> list:
        return []

    def counters(self) -> dict:
        return {}
