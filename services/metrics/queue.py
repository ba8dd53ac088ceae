"""Queue and service state read from Redis at scrape time (``QueueCollector``): jobs by state
and priority, live workers, and the service counters as Prometheus counter families.
Naming and counters: docs/architecture.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.metrics.labels import label_value
from services.queue.parsing import finite
from services.queue.registry import is_unhealthy

log = logging.getLogger(__name__)

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

# services/queue/queue.lua's finish outcomes: label values exported from 0 before their first event.
FINISH_OUTCOMES = ("succeeded", "failed", "cancelled", "dead_lettered")


class QueueReader(Protocol):
    """The read interface of ``services.queue.jobqueue`` that the collector uses."""

    def state_counts(self) -> Mapping[tuple[str, Any], int]: ...

    def workers(self) -> list[dict]: ...

    def counters(self) -> Mapping[str, float]: ...


_UNHEALTHY_DOC = ("Live capsctl workers that claim no job because they report themselves unhealthy, e.g. a "
                  "read-only or full artifact store (from Redis).")


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
        yield GaugeMetricFamily("capsnet_workers_unhealthy", _UNHEALTHY_DOC)
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
        unhealthy = sum(1 for w in workers if isinstance(w, Mapping) and is_unhealthy(w))
        yield GaugeMetricFamily("capsnet_workers_unhealthy", _UNHEALTHY_DOC, value=unhealthy)

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
    """Every (kind, model) label pair the job specs can produce (``services.spec.jobspec``): train ×
    each model, eval × ``-``, tune × each non-empty set of models (``capsnet+lenet5``)."""
    from itertools import combinations

    from services.spec.jobspec import MODEL_NAMES
    from services.spec.types import KINDS

    models = sorted(MODEL_NAMES)
    sets = ["+".join(c) for n in range(1, len(models) + 1) for c in combinations(models, n)]
    by_kind = {"train": list(models), "eval": ["-"], "tune": sets}
    return [(kind, model) for kind in KINDS for model in by_kind.get(kind, ["none"])]

