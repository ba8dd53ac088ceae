"""Prometheus metrics for capsctl: queue state read from Redis at scrape time (``QueueCollector``),
the worker's own histograms (``WorkerMetrics``) and live training gauges (``TrainingMetrics``).
Naming, counters and the worker's wiring: docs/architecture.md.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from capsnet_core.suites import SUITE_RESULTS

from .parsing import finite, first

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9310
PREFIX = "capsnet_"

# Histogram buckets (seconds): a queue wait runs from instant to hours, a run from seconds to a day.
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
RUN_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# Seconds from a worker taking a train job to its first step: mostly Ray Train starting processes.
ADMISSION_OUTCOMES = ("reserved", "timeout", "ended")
STARTUP_BUCKETS = (1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)

# counters() key head -> (metric name without _total, label names after the head, help)
_LABELLED_COUNTERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "submitted": ("capsnet_jobs_submitted", ("kind", "model"), "Jobs submitted to the queue."),
    "finished": ("capsnet_jobs_finished", ("kind", "model", "outcome"),
                 "Jobs that reached a terminal state, by outcome."),
}
_PLAIN_COUNTERS: dict[str, tuple[str, str]] = {
    "retries": ("capsnet_job_retries", "Job attempts re-queued for another try."),
    "lease_expiries": ("capsnet_lease_expiries", "Job leases that expired (worker died or stalled)."),
    "dead_lettered": ("capsnet_dead_lettered", "Jobs or queue entries moved to the dead-letter list (invalid spec, junk in a queue key)."),
    "manual_retries": ("capsnet_job_manual_retries", "Failed or cancelled jobs re-queued by hand (capsctl retry)."),
    "pruned": ("capsnet_jobs_pruned", "Finished jobs removed by retention (idle workers, capsctl prune)."),
    "infrastructure_losses": ("capsnet_infrastructure_losses",
                              "Job attempts handed back because their Ray node or a rank's process died."),
}

# What the service produces (services.jobspec.KINDS; services.worker's attempt outcomes;
# services/queue.lua's finish outcomes): label values exported from 0 before their first event.
JOB_KINDS = ("train", "eval", "tune")
RUN_OUTCOMES = ("succeeded", "failed", "cancelled", "lost")
FINISH_OUTCOMES = ("succeeded", "failed", "cancelled", "dead_lettered")
# How long a finished job's test accuracies stay on /metrics (the worker's default): two scrapes
# at Prometheus' usual 15 s interval (the deploy configs scrape workers every 5 s), so the final
# accuracy per angle, set in the job's last seconds, is always recorded.
RESULT_LINGER_SECONDS = 30.0

_LABEL_RE = re.compile(r"[^a-z0-9_.:+-]+")
_MAX_LABEL_LEN = 40


def label_value(value: object) -> str:
    """A bounded label value: lower case, ``[a-z0-9_.:+-]`` only, at most 40 characters; "none"
    when nothing is left (empty, None, "?")."""
    text = _LABEL_RE.sub("_", str(value).strip().lower())[:_MAX_LABEL_LEN]
    return text if text.strip("_") and value is not None else "none"


def angle_label(angle: object) -> str:
    """Evaluation angle as a label: 35 / 35.0 / "35" -> "35", 7.5 -> "7.5"."""
    try:
        return f"{float(angle):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return label_value(angle)


# --------------------------------------------------------------------------- HTTP server

_servers: dict[int, Any] = {}


def start_metrics_server(port: int = DEFAULT_METRICS_PORT, registry: CollectorRegistry = REGISTRY,
                         addr: str = "0.0.0.0") -> int:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread; returns the bound port.

    ``port=0`` lets the OS pick a free port.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    _servers[bound] = server
    return bound


def stop_metrics_server(port: int) -> None:
    """Stop a server started by :func:`start_metrics_server` (no-op if unknown)."""
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- queue collector

class QueueReader(Protocol):
    """The read interface of ``services.queue`` that the collector uses."""

    def state_counts(self) -> Mapping[tuple[str, Any], int]: ...

    def workers(self) -> list[dict]: ...

    def counters(self) -> Mapping[str, float]: ...


class QueueCollector(Collector):
    """Scrape-time metrics computed from Redis via the queue's read interface.

    Exposes ``capsnet_jobs{state,priority}``, ``capsnet_workers_alive``, the service counters
    (see docs/architecture.md) and ``capsnet_redis_up`` (0 when Redis could not be read; the other
    series are then left out of that scrape rather than reported wrong).

    ``zero_fill``: (kind, model) pairs whose ``submitted`` counter, and whose ``finished`` counter
    for every outcome in ``FINISH_OUTCOMES``, are exported as 0 before their first event (with it,
    so are the ``finished`` counters of every submitted pair); typically ``known_job_labels()``.
    Default: no zero-filled series.
    """

    def __init__(self, queue: QueueReader, zero_fill: Iterable[tuple[str, str]] | None = None) -> None:
        self.queue = queue
        self.zero_fill: tuple[tuple[str, str], ...] | None = (
            None if zero_fill is None else tuple((str(k), str(m)) for k, m in zero_fill))

    def describe(self) -> Iterable[Metric]:
        # Families without samples: registering must not touch Redis.
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("capsnet_jobs", "Jobs in the queue by state and priority (from Redis).",
                                labels=["state", "priority"])
        yield GaugeMetricFamily("capsnet_workers_alive", "capsctl workers with a live heartbeat (from Redis).")
        for name, labels, doc in _LABELLED_COUNTERS.values():
            yield CounterMetricFamily(name, doc + " (from Redis)", labels=list(labels))
        for name, doc in _PLAIN_COUNTERS.values():
            yield CounterMetricFamily(name, doc + " (from Redis)")
        yield GaugeMetricFamily("capsnet_redis_up", "1 if this scrape could read the queue state from Redis.")

    def collect(self) -> Iterable[Metric]:
        try:
            states = dict(self.queue.state_counts())
            workers = list(self.queue.workers())
            counters = dict(self.queue.counters())
        except Exception as exc:  # a broken Redis must not break the rest of /metrics
            log.warning("metrics: cannot read queue state from Redis: %s", exc)
            yield GaugeMetricFamily("capsnet_redis_up", "1 if this scrape could read the queue state from Redis.",
                                    value=0)
            return

        jobs = GaugeMetricFamily("capsnet_jobs", "Jobs in the queue by state and priority (from Redis).",
                                 labels=["state", "priority"])
        merged: dict[tuple[str, str], float] = {}
        for key, count in states.items():
            state, priority = key
            labels = (label_value(state), label_value(priority))
            merged[labels] = merged.get(labels, 0.0) + float(count)
        for labels, count in sorted(merged.items()):
            jobs.add_metric(list(labels), count)
        yield jobs

        alive = sum(1 for w in workers if not isinstance(w, Mapping) or w.get("alive", True))
        yield GaugeMetricFamily("capsnet_workers_alive",
                                "capsctl workers with a live heartbeat (from Redis).", value=alive)

        yield from _counter_families(counters, self.zero_fill)
        yield GaugeMetricFamily("capsnet_redis_up", "1 if this scrape could read the queue state from Redis.",
                                value=1)


def _counter_families(counters: Mapping[str, Any],
                      zero_fill: Iterable[tuple[str, str]] | None = None) -> Iterator[Metric]:
    sums: dict[str, dict[tuple[str, ...], float]] = {head: {} for head in _LABELLED_COUNTERS}
    plain: dict[str, float] = dict.fromkeys(_PLAIN_COUNTERS, 0.0)
    for head, labels, value in _flatten_counters(counters):
        if head in _PLAIN_COUNTERS and not labels:
            plain[head] += value
        elif head in _LABELLED_COUNTERS and len(labels) == len(_LABELLED_COUNTERS[head][1]):
            key = tuple(label_value(v) for v in labels)
            sums[head][key] = sums[head].get(key, 0.0) + value
    if zero_fill is not None:
        pairs = {(label_value(k), label_value(m)) for k, m in zero_fill}
        for pair in pairs:
            sums["submitted"].setdefault(pair, 0.0)
        for pair in list(sums["submitted"]):
            for outcome in FINISH_OUTCOMES:
                sums["finished"].setdefault((*pair, outcome), 0.0)
    for head, (name, label_names, doc) in _LABELLED_COUNTERS.items():
        family = CounterMetricFamily(name, doc + " (from Redis)", labels=list(label_names))
        for key, value in sorted(sums[head].items()):
            family.add_metric(list(key), value)
        yield family
    for head, (name, doc) in _PLAIN_COUNTERS.items():
        yield CounterMetricFamily(name, doc + " (from Redis)", value=plain[head])


def _flatten_counters(counters: Mapping[Any, Any]) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(head, labels, value) of ``JobQueue.counters()``: ``{"retries": n, "submitted":
    {(kind, model): n}, ...}``; values that are not finite counts (>= 0) are left out."""
    for raw_key, raw_value in counters.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        if isinstance(raw_value, Mapping):
            for labels, value in raw_value.items():
                labels = labels if isinstance(labels, tuple | list) else (labels,)
                number = finite(value)
                if number is not None and number >= 0:
                    yield key, tuple(str(v) for v in labels), number
        else:
            number = finite(raw_value)
            if number is not None and number >= 0:
                yield key, (), number


def known_job_labels() -> list[tuple[str, str]]:
    """Every (kind, model) label pair the job specs can produce (``services.jobspec``): train ×
    each model, eval × ``-``, tune × each non-empty set of models (``capsnet+lenet5``)."""
    from itertools import combinations

    from .jobspec import KINDS, MODEL_NAMES

    models = sorted(MODEL_NAMES)
    sets = ["+".join(c) for n in range(1, len(models) + 1) for c in combinations(models, n)]
    by_kind = {"train": list(models), "eval": ["-"], "tune": sets}
    return [(kind, model) for kind in KINDS for model in by_kind.get(kind, ["none"])]


# --------------------------------------------------------------------------- training metrics

_JOB_LABELS = ("job_id", "model")
# A job's result series: (its gauge, the angle or suite label); kept to remove them later.
_Result = tuple[Gauge, str]


class TrainingMetrics:
    """Live gauges of the jobs this worker is training, labelled ``job_id`` and ``model``.

    ``observe(job_id, model, event)`` takes the training loop's progress events
    (``capsnet_core.train`` ``on_progress``); keys that are missing or None are ignored:

    * ``epoch`` -> capsnet_train_epoch; ``step`` (within the epoch, 1-based) with
      ``steps_per_epoch`` -> capsnet_train_step as the global step ``(epoch-1)*steps_per_epoch+step``
      (``step`` as given when either is missing)
    * ``loss`` / ``train_loss`` -> capsnet_train_loss; ``accuracy`` / ``train_accuracy`` ->
      capsnet_train_accuracy_ratio; ``lr`` -> capsnet_train_learning_rate
    * ``images_per_second`` -> capsnet_train_images_per_second; ``epoch_seconds`` ->
      capsnet_train_epoch_duration_seconds
    * ``test_accuracy``: a dict ``{angle: ratio}`` -> capsnet_test_accuracy_ratio{angle}; a plain
      float (the upright accuracy of an ``epoch`` event) -> the ``angle="0"`` series
    * ``suite_accuracy``: a dict ``{result: ratio}`` of the test suites' summaries (``eval`` and last
      ``epoch`` events) -> capsnet_suite_accuracy_ratio{suite}; ``suite`` is one of
      ``capsnet_core.suites.SUITE_RESULTS`` (rotation_auc: the mean accuracy over 0..180 degrees;
      affine-mnist / affnist: accuracy on that set), other keys are ignored
    * ``gpu_memory_bytes`` (only set on CUDA) -> capsnet_gpu_memory_used_bytes

    ``remove(job_id)`` drops all of a job's series; with ``result_linger_seconds`` > 0 its test
    and suite accuracies (the job's result, set in its last seconds) are dropped that much later, so a
    scrape every few seconds still records them (observing the job again keeps them).  At most
    ``max_jobs`` jobs are kept (and as many lingering): observing one more evicts the least
    recently updated, so a missed ``remove`` cannot grow cardinality.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, max_jobs: int = 32,
                 max_angles: int = 64, result_linger_seconds: float = 0.0) -> None:
        self.max_jobs = max_jobs
        self.max_angles = max_angles
        self.result_linger_seconds = float(result_linger_seconds)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*_JOB_LABELS, *extra], registry=registry)

        self.epoch = gauge("capsnet_train_epoch", "Current epoch of a running job (1-based).")
        self.step = gauge("capsnet_train_step", "Optimizer steps done by a running job (global step).")
        self.loss = gauge("capsnet_train_loss", "Latest training loss of a running job.")
        self.accuracy = gauge("capsnet_train_accuracy_ratio", "Latest training accuracy (0..1) of a running job.")
        self.learning_rate = gauge("capsnet_train_learning_rate", "Current learning rate of a running job.")
        self.images_per_second = gauge("capsnet_train_images_per_second",
                                       "Training throughput of a running job (all ranks).")
        self.epoch_duration = gauge("capsnet_train_epoch_duration_seconds",
                                    "Wall time of the last finished epoch of a running job.")
        self.test_accuracy = gauge("capsnet_test_accuracy_ratio",
                                   "Test accuracy (0..1) of a running job by evaluation rotation angle (degrees).",
                                   ("angle",))
        self.suite_accuracy = gauge(
            "capsnet_suite_accuracy_ratio",
            "Test suite result (0..1) of a running job: suite=rotation_auc (mean accuracy over 0..180 degrees), "
            "affine-mnist or affnist (accuracy on that set).", ("suite",))
        self.gpu_memory = gauge("capsnet_gpu_memory_used_bytes",
                                "Peak CUDA memory allocated by a running job (rank 0); only on CUDA.")
        self._plain = (self.epoch, self.step, self.loss, self.accuracy, self.learning_rate,
                       self.images_per_second, self.epoch_duration, self.gpu_memory)
        # job_id label -> (model label, result series seen as (gauge, angle or suite label));
        # ordered by last update
        self._jobs: OrderedDict[str, tuple[str, set[_Result]]] = OrderedDict()
        # ended jobs whose results linger: job_id label -> (model label, results, timer)
        self._lingering: OrderedDict[str, tuple[str, set[_Result], threading.Timer]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, job_id: str, model: str, event: Mapping[str, Any]) -> None:
        job, model_l = label_value(job_id), label_value(model)
        with self._lock:
            lingering = self._lingering.pop(job, None)
            if lingering is not None:  # the job runs again on this worker (a retry)
                lingering[2].cancel()
                if lingering[0] == model_l and job not in self._jobs:
                    self._jobs[job] = (model_l, lingering[1])
                else:
                    _discard_results(job, lingering[0], lingering[1])
            entry = self._jobs.get(job)
            if entry is not None and entry[0] != model_l:  # model changed: drop old series
                self._remove_locked(job)
                entry = None
            if entry is None:
                entry = (model_l, set())
                self._jobs[job] = entry
                while len(self._jobs) > self.max_jobs:
                    self._remove_locked(next(iter(self._jobs)))
            self._jobs.move_to_end(job)
            results = entry[1]
            labels = (job, model_l)

            def put(g: Gauge, value: Any) -> None:
                number = _number(value)
                if number is not None:
                    g.labels(*labels).set(number)

            epoch, step, per_epoch = _number(event.get("epoch")), _number(event.get("step")), \
                _number(event.get("steps_per_epoch"))
            put(self.epoch, epoch)
            if step is not None:
                put(self.step, (epoch - 1) * per_epoch + step if epoch is not None and per_epoch else step)
            put(self.loss, first(event, "loss", "train_loss"))
            put(self.accuracy, first(event, "accuracy", "train_accuracy"))
            put(self.learning_rate, event.get("lr"))
            put(self.images_per_second, event.get("images_per_second"))
            put(self.epoch_duration, event.get("epoch_seconds"))
            put(self.gpu_memory, event.get("gpu_memory_bytes"))
            test = event.get("test_accuracy")
            if isinstance(test, Mapping):
                items = list(test.items())
            elif _number(test) is not None:
                items = [("0", test)]
            else:
                items = []
            n_angles = sum(1 for g, _ in results if g is self.test_accuracy)
            for angle, value in items:
                number = _number(value)
                key = angle_label(angle)
                new = (self.test_accuracy, key) not in results
                if number is None or (new and n_angles >= self.max_angles):
                    continue
                n_angles += new
                results.add((self.test_accuracy, key))
                self.test_accuracy.labels(*labels, key).set(number)
            suites = event.get("suite_accuracy")
            for suite, value in (suites.items() if isinstance(suites, Mapping) else ()):
                number = _number(value)
                if number is None or suite not in SUITE_RESULTS:  # bounded: only the known results
                    continue
                results.add((self.suite_accuracy, suite))
                self.suite_accuracy.labels(*labels, suite).set(number)

    def remove(self, job_id: str) -> None:
        """Drop every series of ``job_id`` (call when the job ends, whatever the outcome); its
        test and suite accuracies after ``result_linger_seconds``."""
        job = label_value(job_id)
        with self._lock:
            entry = self._jobs.get(job)
            if self.result_linger_seconds <= 0 or entry is None or not entry[1]:
                self._remove_locked(job)
                return
            del self._jobs[job]
            model_l, results = entry
            for g in self._plain:
                _discard(g, job, model_l)
            timer = threading.Timer(self.result_linger_seconds, lambda: self._expire(job, timer))
            timer.daemon = True
            self._lingering[job] = (model_l, results, timer)
            while len(self._lingering) > self.max_jobs:
                old_job, (old_model, old_results, old_timer) = self._lingering.popitem(last=False)
                old_timer.cancel()
                _discard_results(old_job, old_model, old_results)
        timer.start()

    def _expire(self, job: str, timer: threading.Timer) -> None:
        with self._lock:
            lingering = self._lingering.get(job)
            if lingering is None or lingering[2] is not timer:  # observed again since, or evicted
                return
            del self._lingering[job]
            _discard_results(job, lingering[0], lingering[1])

    def gauges(self) -> list[Gauge]:
        return [*self._plain, self.test_accuracy, self.suite_accuracy]

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def lingering(self) -> list[str]:
        """Ended jobs whose test and suite accuracies are still exported."""
        with self._lock:
            return list(self._lingering)

    def _remove_locked(self, job: str) -> None:
        entry = self._jobs.pop(job, None)
        if entry is None:
            return
        model_l, results = entry
        for g in self._plain:
            _discard(g, job, model_l)
        _discard_results(job, model_l, results)


def _number(value: Any) -> float | None:
    """A progress event's number: finite, and not text (numeric text is not a number there)."""
    return None if isinstance(value, str) else finite(value)


def _discard(g: Gauge, *labels: str) -> None:
    try:
        g.remove(*labels)
    except KeyError:
        pass


def _discard_results(job: str, model: str, results: Iterable[_Result]) -> None:
    for g, key in results:
        _discard(g, job, model, key)


# --------------------------------------------------------------------------- worker metrics

class WorkerMetrics:
    """Process-local metrics of one ``capsctl worker``: queue wait, run time, Ray cluster size.

    The histograms of every kind in ``kinds`` (and of every outcome in ``RUN_OUTCOMES``) are
    exported from 0 on: without that series, ``rate()`` cannot see a worker's first claim of a
    kind, and the latency panels stay empty for a worker that ran one job.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, max_jobs: int = 32,
                 kinds: Iterable[str] = JOB_KINDS, result_linger_seconds: float = 0.0) -> None:
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
        self.cluster_gpus = Gauge("capsnet_ray_cluster_gpus", "GPUs in the Ray cluster (state=total|available).",
                                  ["state"], registry=registry)
        self.cluster_cpus = Gauge("capsnet_ray_cluster_cpus", "CPUs in the Ray cluster (state=total|available).",
                                  ["state"], registry=registry)
        self.events_dropped = Counter(
            "capsnet_events_dropped",
            "Job events (progress, logs) not written because Redis was unavailable; the job's outcome "
            "is never dropped, it waits for Redis.", registry=registry)
        self.training = TrainingMetrics(registry=registry, max_jobs=max_jobs,
                                        result_linger_seconds=result_linger_seconds)
        for outcome in ADMISSION_OUTCOMES:
            self.admission.labels(outcome)
        for kind in kinds:
            self.queue_wait.labels(label_value(kind))
            for outcome in RUN_OUTCOMES:
                self.run_duration.labels(label_value(kind), outcome)

    def collectors(self) -> list[Collector]:
        return [self.queue_wait, self.run_duration, self.startup, self.admission, self.cluster_gpus, self.cluster_cpus,
                self.events_dropped, *self.training.gauges()]

    def observe_queue_wait(self, kind: str, seconds: float) -> None:
        self.queue_wait.labels(label_value(kind)).observe(max(0.0, float(seconds)))

    def observe_run_duration(self, kind: str, outcome: str, seconds: float) -> None:
        self.run_duration.labels(label_value(kind), label_value(outcome)).observe(max(0.0, float(seconds)))

    def count_dropped_events(self, n: int = 1) -> None:
        if n > 0:
            self.events_dropped.inc(n)

    def observe_admission(self, outcome: str, seconds: float) -> None:
        self.admission.labels(label_value(outcome)).observe(max(0.0, float(seconds)))

    def observe_startup(self, seconds: float) -> None:
        self.startup.observe(max(0.0, float(seconds)))

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
