"""Series lifecycle in services.metrics.worker: what is exported before a first event (so ``rate()`` and
``increase()`` see it) and how long a finished job's result stays on ``/metrics``."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import labels as ml
from services.metrics import queue as mq
from services.metrics import training as mt
from services.metrics import worker as m

Samples = dict[tuple[str, frozenset], float]


def samples(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def with_labels(s: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    return [dict(lab) for (n, lab) in s if n == name and labels.items() <= dict(lab).items()]


class Queue:
    """The queue's read interface, as services.queue.jobqueue.JobQueue returns it (nested counters)."""

    def __init__(self, counters: dict) -> None:
        self._counters = counters

    def state_counts(self) -> dict:
        return {("queued", "normal"): 0}

    def workers(self) -> list:
        return []

    def counters(self) -> dict:
        return self._counters


def test_known_job_labels_match_the_job_specs() -> None:
    from services.spec.jobspec import parse_spec
    from services.spec.types import KINDS

    pairs = mq.known_job_labels()
    assert {k for k, _ in pairs} == set(KINDS) == set(m.JOB_KINDS)
    for spec in ({"kind": "train", "model": "capsnet"}, {"kind": "train", "model": "lenet5"},
                 {"kind": "eval", "source": "/x/checkpoint.pt"}, {"kind": "tune"},
                 {"kind": "tune", "models": ["lenet5"]}):
        parsed = parse_spec(spec)
        assert (parsed.kind, ml.label_value(parsed.label)) in pairs, spec


def test_queue_counters_zero_filled_for_known_jobs() -> None:
    queue = Queue({"submitted": {("train", "capsnet"): 2, ("train", "resnet"): 1},
                   "finished": {("train", "capsnet", "succeeded"): 1}, "retries": 0})
    registry = CollectorRegistry()
    registry.register(mq.QueueCollector(queue, zero_fill=[("train", "capsnet"), ("eval", "-")]))
    s = samples(registry)
    assert s[("capsnet_jobs_submitted_total", frozenset({("kind", "train"), ("model", "capsnet")}))] == 2
    assert s[("capsnet_jobs_submitted_total", frozenset({("kind", "eval"), ("model", "-")}))] == 0
    finished = {(lab["kind"], lab["model"], lab["outcome"]): s[("capsnet_jobs_finished_total", frozenset(lab.items()))]
                for lab in with_labels(s, "capsnet_jobs_finished_total")}
    # every outcome of every known or submitted (kind, model), from 0; real counts untouched
    assert set(finished) == {(k, mo, o) for k, mo in [("train", "capsnet"), ("eval", "-"), ("train", "resnet")]
                             for o in mq.FINISH_OUTCOMES}
    assert finished[("train", "capsnet", "succeeded")] == 1
    assert sum(finished.values()) == 1

    # Without zero_fill nothing is added (the default).
    plain = CollectorRegistry()
    plain.register(mq.QueueCollector(queue))
    assert with_labels(samples(plain), "capsnet_jobs_finished_total") == [
        {"kind": "train", "model": "capsnet", "outcome": "succeeded"}]


def test_worker_histograms_exported_from_zero() -> None:
    registry = CollectorRegistry()
    m.WorkerMetrics(registry)
    s = samples(registry)
    assert s[("capsnet_job_startup_seconds_count", frozenset())] == 0
    for kind in m.JOB_KINDS:
        assert s[("capsnet_job_queue_wait_seconds_count", frozenset({("kind", kind)}))] == 0
        for outcome in m.RUN_OUTCOMES:
            assert s[("capsnet_job_run_duration_seconds_count",
                      frozenset({("kind", kind), ("outcome", outcome)}))] == 0


def test_default_worker_metrics_keep_results_for_a_few_scrapes() -> None:
    assert m.default_worker_metrics().training.result_linger_seconds == m.RESULT_LINGER_SECONDS >= 30


EVENTS = [
    {"type": "step", "epoch": 1, "step": 5, "steps_per_epoch": 10, "loss": 0.5, "accuracy": 0.8,
     "lr": 1e-3, "images_per_second": 900.0},
    {"type": "epoch", "epoch": 1, "train_loss": 0.4, "epoch_seconds": 3.0, "test_accuracy": 0.9},
    {"type": "eval", "test_accuracy": {"0": 0.95, "35": 0.6}, "suite_accuracy": {"rotation_auc": 0.55}},
]
RESULTS = ("capsnet_test_accuracy_ratio", "capsnet_suite_accuracy_ratio")


def finished_job(linger: float) -> tuple[CollectorRegistry, mt.TrainingMetrics]:
    """TrainingMetrics that saw job-1 (lenet5) run through EVENTS and end."""
    registry = CollectorRegistry()
    t = mt.TrainingMetrics(registry, result_linger_seconds=linger)
    for event in EVENTS:
        t.observe("job-1", "lenet5", event)
    t.remove("job-1")
    return registry, t


def test_finished_job_result_lingers_then_goes() -> None:
    registry, t = finished_job(linger=0.5)
    s = samples(registry)
    # live gauges go at once; the result (accuracy per angle, suite results) stays
    assert not [k for k in s if k[0] not in RESULTS]
    assert {lab["angle"] for lab in with_labels(s, "capsnet_test_accuracy_ratio", job_id="job-1")} == {"0", "35"}
    assert s[("capsnet_suite_accuracy_ratio",
              frozenset({"job_id": "job-1", "model": "lenet5", "suite": "rotation_auc"}.items()))] == 0.55
    assert t.jobs() == [] and t.lingering() == ["job-1"]
    deadline = time.monotonic() + 5
    while [k for k in samples(registry) if k[0] in RESULTS]:
        assert time.monotonic() < deadline, "the result never left /metrics"
        time.sleep(0.05)
    assert t.lingering() == []


def test_job_observed_again_while_its_result_lingers() -> None:
    registry, t = finished_job(linger=60)
    old_expiry = t._lingering["job-1"][2]
    t.observe("job-1", "lenet5", EVENTS[0])   # a retry of the job on the same worker
    assert old_expiry.finished.is_set()       # the old expiry is cancelled ...
    t._expire("job-1", old_expiry)            # ... and one that fired anyway, racing the retry, drops nothing
    s = samples(registry)
    assert {lab["angle"] for lab in with_labels(s, "capsnet_test_accuracy_ratio")} == {"0", "35"}
    assert with_labels(s, "capsnet_suite_accuracy_ratio") == [{"job_id": "job-1", "model": "lenet5", "suite": "rotation_auc"}]
    assert with_labels(s, "capsnet_train_loss", job_id="job-1")
    t.result_linger_seconds = 0.3
    t.remove("job-1")
    deadline = time.monotonic() + 5
    while [k for k in samples(registry) if k[0].startswith(("capsnet_train", "capsnet_test", "capsnet_suite"))]:
        assert time.monotonic() < deadline, "the retried job's series never left /metrics after its linger"
        time.sleep(0.05)

    # Without a linger (the class default) everything goes at once; a job with no result too.
    now = mt.TrainingMetrics(CollectorRegistry())
    now.observe("job-2", "capsnet", EVENTS[2])
    now.remove("job-2")
    assert now.lingering() == []
    lingering = mt.TrainingMetrics(CollectorRegistry(), result_linger_seconds=60)
    lingering.observe("job-3", "capsnet", EVENTS[0])
    lingering.remove("job-3")
    assert lingering.lingering() == []


def test_lingering_results_are_bounded() -> None:
    registry = CollectorRegistry()
    t = mt.TrainingMetrics(registry, max_jobs=2, result_linger_seconds=60)
    for job in ("a", "b", "c"):
        t.observe(job, "capsnet", EVENTS[2])
        t.remove(job)
    assert t.lingering() == ["b", "c"]
    assert {lab["job_id"] for lab in with_labels(samples(registry), "capsnet_test_accuracy_ratio")} == {"b", "c"}
    assert {lab["job_id"] for lab in with_labels(samples(registry), "capsnet_suite_accuracy_ratio")} == {"b", "c"}


@pytest.mark.parametrize("linger", [0.0, 0.2])
def test_model_change_drops_lingering_series(linger: float) -> None:
    registry = CollectorRegistry()
    t = mt.TrainingMetrics(registry, result_linger_seconds=linger)
    t.observe("job-1", "capsnet", EVENTS[2])
    t.remove("job-1")
    t.observe("job-1", "lenet5", {"test_accuracy": {"15": 0.7}})
    s = samples(registry)
    assert with_labels(s, "capsnet_test_accuracy_ratio") == [{"job_id": "job-1", "model": "lenet5", "angle": "15"}]
    assert with_labels(s, "capsnet_suite_accuracy_ratio") == []   # capsnet's suite result went with it
