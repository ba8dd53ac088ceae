"""services.metrics.worker served over HTTP and parsed back, with queue state from a real Redis."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import http as mh
from services.metrics import labels as ml
from services.metrics import queue as mq
from services.metrics import training as mt
from services.metrics import worker as m
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from tests.conftest import free_port
from tests.service_helpers import wait_until

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """GET /metrics and parse it: ({(sample name, labels): value}, {family name: type})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


class RedisQueueReadDouble:
    """Test double of the queue's *read interface only* (state_counts, workers, counters), backed by
    a real Redis so the collector's scrape-time Redis round trips are exercised. Not the real queue,
    except counters(): the real ``JobQueue.counters()`` over the hash fields ``incr`` writes (named
    as services/queue/queue.lua names them)."""

    def __init__(self, url: str, prefix: str = "test:") -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.queue = JobQueue(redis_client(url), Keys(prefix))

    # writers used by the tests
    def set_state(self, state: str, priority: str | int, n: int) -> None:
        self.r.hset(self.prefix + "states", f"{state}|{priority}", n)

    def heartbeat(self, worker_id: str) -> None:
        self.r.hset(self.prefix + "workers", worker_id, json.dumps({"id": worker_id}))

    def incr(self, key: str, by: float = 1) -> None:
        self.r.hincrbyfloat(self.prefix + "counters", key, by)

    # the read interface
    def state_counts(self) -> dict[tuple[str, str], int]:
        out = {}
        for key, n in self.r.hgetall(self.prefix + "states").items():
            state, priority = key.split("|")
            out[(state, priority)] = int(n)
        return out

    def workers(self) -> list[dict]:
        return [json.loads(v) for v in self.r.hgetall(self.prefix + "workers").values()]

    def counters(self) -> dict[str, Any]:
        return self.queue.counters()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[int]:
    port = mh.start_metrics_server(0, registry=registry, addr="127.0.0.1")
    yield port
    mh.stop_metrics_server(port)


def test_server_binds_requested_or_free_port(registry: CollectorRegistry) -> None:
    wanted = free_port()
    port = mh.start_metrics_server(wanted, registry=registry, addr="127.0.0.1")
    try:
        assert port == wanted
        assert scrape(port) == ({}, {})
    finally:
        mh.stop_metrics_server(port)
    port = mh.start_metrics_server(0, registry=registry, addr="127.0.0.1")
    try:
        assert port > 0
        scrape(port)
    finally:
        mh.stop_metrics_server(port)


def test_queue_collector_reads_redis_at_scrape_time(redis_url: str, registry: CollectorRegistry,
                                                     served: int) -> None:
    q = RedisQueueReadDouble(redis_url)
    q.set_state("queued", 0, 3)
    q.set_state("queued", 5, 1)
    q.set_state("running", 0, 2)
    q.heartbeat("w1")
    q.heartbeat("w2")
    q.incr("submitted:train:capsnet", 4)
    q.incr("submitted:tune:capsnet+lenet5")
    q.incr("finished:train:capsnet:succeeded", 2)
    q.incr("finished:train:capsnet:failed")
    q.incr("retries", 2)
    q.incr("bogus:key")               # unknown head: ignored
    q.incr("submitted:train")         # wrong arity: ignored
    registry.register(mq.QueueCollector(q))

    s, types = scrape(served)
    assert get(s, "capsnet_jobs", state="queued", priority="0") == 3
    assert get(s, "capsnet_jobs", state="queued", priority="5") == 1
    assert get(s, "capsnet_jobs", state="running", priority="0") == 2
    assert get(s, "capsnet_workers_alive") == 2
    assert get(s, "capsnet_jobs_submitted_total", kind="train", model="capsnet") == 4
    assert get(s, "capsnet_jobs_submitted_total", kind="tune", model="capsnet+lenet5") == 1
    assert get(s, "capsnet_jobs_finished_total", kind="train", model="capsnet", outcome="succeeded") == 2
    assert get(s, "capsnet_jobs_finished_total", kind="train", model="capsnet", outcome="failed") == 1
    assert get(s, "capsnet_job_retries_total") == 2
    assert get(s, "capsnet_lease_expiries_total") == 0     # always present, 0 until counted
    assert get(s, "capsnet_dead_lettered_total") == 0
    assert get(s, "capsnet_job_manual_retries_total") == 0
    assert get(s, "capsnet_redis_up") == 1
    assert len(series(s, "capsnet_jobs_submitted_total")) == 2
    assert types["capsnet_jobs_submitted"] == "counter"
    assert types["capsnet_jobs"] == "gauge"

    # Values are read from Redis on every scrape, whoever wrote them.
    q.set_state("queued", 0, 0)
    q.incr("lease_expiries")
    q.incr("dead_lettered")
    q.r.hdel(q.prefix + "workers", "w2")
    s, _ = scrape(served)
    assert get(s, "capsnet_jobs", state="queued", priority="0") == 0
    assert get(s, "capsnet_lease_expiries_total") == 1
    assert get(s, "capsnet_dead_lettered_total") == 1
    assert get(s, "capsnet_workers_alive") == 1


def test_queue_collector_survives_redis_down(registry: CollectorRegistry, served: int) -> None:
    down = RedisQueueReadDouble(f"redis://127.0.0.1:{free_port()}/0")
    registry.register(mq.QueueCollector(down))
    worker = m.WorkerMetrics(registry)
    worker.set_cluster_resources({"CPU": 4}, {"CPU": 4})
    s, _ = scrape(served)
    assert get(s, "capsnet_redis_up") == 0
    assert series(s, "capsnet_jobs") == [] and get(s, "capsnet_workers_alive") is None
    assert get(s, "capsnet_ray_cluster_cpus", state="total") == 4   # the rest of /metrics still works


def test_registering_collector_does_not_touch_redis() -> None:
    class Exploding:
        def state_counts(self):
            raise AssertionError("state_counts called at registration")

        workers = counters = state_counts

    reg = CollectorRegistry(auto_describe=True)
    reg.register(mq.QueueCollector(Exploding()))  # describe() must not query


def test_counters_nested_form_of_the_real_queue(registry: CollectorRegistry, served: int) -> None:
    class Nested:
        def state_counts(self):
            return {("queued", "high"): 1, ("queued", "normal"): 0}

        def workers(self):
            return [{"id": "w1"}, {"id": "w2", "alive": False}]

        def counters(self):
            return {"submitted": {("train", "capsnet"): 3, ("eval", "?"): 1},
                    "finished": {("train", "capsnet", "dead_lettered"): 1, ("train", "capsnet"): 9},
                    "retries": 2, "lease_expiries": 1, "dead_lettered": 1, "manual_retries": 4,
                    "something_new": 7, "retries:extra": "x"}

    registry.register(mq.QueueCollector(Nested()))
    s, _ = scrape(served)
    assert get(s, "capsnet_jobs", state="queued", priority="high") == 1
    assert get(s, "capsnet_jobs", state="queued", priority="normal") == 0
    assert get(s, "capsnet_workers_alive") == 1
    assert get(s, "capsnet_jobs_submitted_total", kind="train", model="capsnet") == 3
    assert get(s, "capsnet_jobs_submitted_total", kind="eval", model="none") == 1
    assert series(s, "capsnet_jobs_finished_total") == [
        {"kind": "train", "model": "capsnet", "outcome": "dead_lettered"}]
    assert get(s, "capsnet_job_retries_total") == 2
    assert get(s, "capsnet_lease_expiries_total") == 1
    assert get(s, "capsnet_dead_lettered_total") == 1
    assert get(s, "capsnet_job_manual_retries_total") == 4
    assert not [k for k in s if "something_new" in k[0]]


def test_collector_with_the_real_queue(redis_url: str, registry: CollectorRegistry, served: int) -> None:
    queue_mod = pytest.importorskip("services.queue.jobqueue")
    from services.queue.keys import Keys

    q = queue_mod.JobQueue(redis.Redis.from_url(redis_url), Keys("metrics-test:"))
    q.submit({"kind": "train", "model": "capsnet", "epochs": 1}, check_capacity=False)
    q.submit({"kind": "train", "model": "lenet5", "epochs": 1}, check_capacity=False)
    q.register_worker("w-metrics", {"resources": {"gpus": 0, "cpus": 2}})
    registry.register(mq.QueueCollector(q))
    s, _ = scrape(served)
    assert get(s, "capsnet_redis_up") == 1
    assert get(s, "capsnet_jobs", state="queued", priority="normal") == 2
    assert get(s, "capsnet_jobs", state="running", priority="normal") == 0
    assert get(s, "capsnet_workers_alive") == 1
    assert get(s, "capsnet_jobs_submitted_total", kind="train", model="capsnet") == 1
    assert get(s, "capsnet_jobs_submitted_total", kind="train", model="lenet5") == 1


def test_worker_histograms_and_cluster_resources(registry: CollectorRegistry, served: int) -> None:
    w = m.WorkerMetrics(registry)
    w.observe_queue_wait("train", 0.3)
    w.observe_queue_wait("train", 45)
    w.observe_run_duration("train", "succeeded", 12.5)
    w.observe_run_duration("sweep", "failed", 2)
    w.set_cluster_resources({"CPU": 16.0, "GPU": 2.0, "memory": 1e9}, {"CPU": 10.0})
    s, types = scrape(served)
    assert types["capsnet_job_queue_wait_seconds"] == "histogram"
    assert get(s, "capsnet_job_queue_wait_seconds_count", kind="train") == 2
    assert get(s, "capsnet_job_queue_wait_seconds_sum", kind="train") == pytest.approx(45.3)
    assert get(s, "capsnet_job_queue_wait_seconds_bucket", kind="train", le="0.5") == 1
    assert get(s, "capsnet_job_queue_wait_seconds_bucket", kind="train", le="60.0") == 2
    assert get(s, "capsnet_job_run_duration_seconds_count", kind="train", outcome="succeeded") == 1
    assert get(s, "capsnet_job_run_duration_seconds_bucket", kind="sweep", outcome="failed", le="5.0") == 1
    assert get(s, "capsnet_ray_cluster_gpus", state="total") == 2
    assert get(s, "capsnet_ray_cluster_gpus", state="available") == 0   # missing key = 0
    assert get(s, "capsnet_ray_cluster_cpus", state="total") == 16
    assert get(s, "capsnet_ray_cluster_cpus", state="available") == 10


TRAIN_SERIES = ("capsnet_train_epoch", "capsnet_train_step", "capsnet_train_loss", "capsnet_train_accuracy_ratio",
                "capsnet_train_learning_rate", "capsnet_train_images_per_second",
                "capsnet_train_epoch_duration_seconds", "capsnet_test_accuracy_ratio",
                "capsnet_suite_accuracy_ratio", "capsnet_gpu_memory_used_bytes")


def test_training_metrics_observe_and_remove(registry: CollectorRegistry, served: int) -> None:
    w = m.WorkerMetrics(registry)
    t = w.training
    # event shapes of capsnet_core.train: step, epoch (upright test accuracy as a float), eval
    t.observe("job-a", "capsnet", {"type": "step", "epoch": 2, "step": 5, "steps_per_epoch": 10,
                                   "loss": 0.25, "accuracy": 0.9, "lr": 1e-3, "images_per_second": 1500.0})
    t.observe("job-a", "capsnet", {"type": "epoch", "epoch": 2, "train_loss": 0.2, "train_accuracy": 0.93,
                                   "lr": 9e-4, "epoch_seconds": 12.5, "images_per_second": 1400.0,
                                   "test_accuracy": 0.95, "test_loss": 0.1, "epochs": 3,
                                   "gpu_memory_bytes": None})
    t.observe("job-a", "capsnet", {"type": "eval", "test_accuracy": {"0": 0.99, "35": 0.7, 7.5: 0.97},
                                   "suite_accuracy": {"rotation_auc": 0.61, "affine-mnist": 0.83}})
    # suite labels are bounded to the known results: unknown keys and junk values are dropped
    t.observe("job-a", "capsnet", {"type": "eval", "suite_accuracy": {"made-up": 0.5, "affnist": "n/a"}})
    t.observe("job-a", "capsnet", {"type": "eval", "suite_accuracy": [0.5]})
    t.observe("job-b", "lenet5", {"type": "step", "epoch": 1, "step": 3, "loss": 1.5,
                                  "gpu_memory_bytes": 123456789, "unknown": "ignored"})

    s, _ = scrape(served)
    a = {"job_id": "job-a", "model": "capsnet"}
    assert get(s, "capsnet_train_epoch", **a) == 2
    assert get(s, "capsnet_train_step", **a) == 15            # (2-1)*10 + 5
    assert get(s, "capsnet_train_loss", **a) == 0.2
    assert get(s, "capsnet_train_accuracy_ratio", **a) == 0.93
    assert get(s, "capsnet_train_learning_rate", **a) == 9e-4
    assert get(s, "capsnet_train_images_per_second", **a) == 1400
    assert get(s, "capsnet_train_epoch_duration_seconds", **a) == 12.5
    assert get(s, "capsnet_test_accuracy_ratio", angle="0", **a) == 0.99
    assert get(s, "capsnet_test_accuracy_ratio", angle="35", **a) == 0.7
    assert get(s, "capsnet_test_accuracy_ratio", angle="7.5", **a) == 0.97
    assert get(s, "capsnet_suite_accuracy_ratio", suite="rotation_auc", **a) == 0.61
    assert get(s, "capsnet_suite_accuracy_ratio", suite="affine-mnist", **a) == 0.83
    assert {lab["suite"] for lab in series(s, "capsnet_suite_accuracy_ratio")} == {"rotation_auc", "affine-mnist"}
    assert get(s, "capsnet_gpu_memory_used_bytes", **a) is None  # not on CUDA
    b = {"job_id": "job-b", "model": "lenet5"}
    assert get(s, "capsnet_train_step", **b) == 3             # no steps_per_epoch: as given
    assert get(s, "capsnet_gpu_memory_used_bytes", **b) == 123456789
    assert get(s, "capsnet_train_accuracy_ratio", **b) is None

    t.remove("job-a")
    s, _ = scrape(served)
    for name in TRAIN_SERIES:
        assert all(lab["job_id"] != "job-a" for lab in series(s, name)), name
    assert get(s, "capsnet_train_loss", **b) == 1.5
    assert t.jobs() == ["job-b"]
    t.remove("job-b")
    t.remove("never-seen")
    s, _ = scrape(served)
    assert not [k for k in s if k[0] in TRAIN_SERIES]


def test_training_metrics_bound_cardinality(registry: CollectorRegistry, served: int) -> None:
    t = mt.TrainingMetrics(registry, max_jobs=2, max_angles=3)
    for job in ("j1", "j2", "j3"):
        t.observe(job, "capsnet", {"loss": 1.0})
    t.observe("j3", "capsnet", {"test_accuracy": {str(a): 0.5 for a in range(0, 90, 15)}})
    t.observe("Weird Job/ID!" + "x" * 100, "Caps Net", {"loss": 2.0})
    s, _ = scrape(served)
    jobs = {lab["job_id"] for lab in series(s, "capsnet_train_loss")}
    assert len(jobs) == 2 and "j3" in jobs                   # oldest evicted
    assert len(series(s, "capsnet_test_accuracy_ratio")) == 3  # angles capped
    weird = [lab for lab in series(s, "capsnet_train_loss") if lab["job_id"] != "j3"][0]
    assert len(weird["job_id"]) <= 40 and weird["job_id"].startswith("weird_job_id_")
    assert weird["model"] == "caps_net"


def test_default_worker_metrics_on_global_registry() -> None:
    from prometheus_client import REGISTRY, generate_latest

    w = m.default_worker_metrics()
    assert m.default_worker_metrics() is w
    w.set_cluster_resources({"GPU": 1, "CPU": 8}, {"GPU": 1, "CPU": 8})
    assert b'capsnet_ray_cluster_gpus{state="total"} 1.0' in generate_latest(REGISTRY)


def test_metric_names_follow_conventions() -> None:
    names = m.exposed_metric_names()
    assert names >= {
        "capsnet_jobs", "capsnet_workers_alive", "capsnet_jobs_submitted_total", "capsnet_jobs_finished_total",
        "capsnet_job_retries_total", "capsnet_lease_expiries_total", "capsnet_dead_lettered_total",
        "capsnet_job_queue_wait_seconds_bucket", "capsnet_job_run_duration_seconds_bucket",
        "capsnet_ray_cluster_gpus", "capsnet_ray_cluster_cpus", *TRAIN_SERIES}
    for name in names:
        assert name.startswith("capsnet_"), name
    for name in names - {n for n in names if n.endswith(("_bucket", "_sum", "_count"))}:
        assert not name.endswith(("_seconds_total", "_ms", "_milliseconds", "_percent")), name
    assert {n for n in names if n.endswith("_bucket")} == {
        "capsnet_job_queue_wait_seconds_bucket", "capsnet_job_run_duration_seconds_bucket",
        "capsnet_job_startup_seconds_bucket", "capsnet_job_admission_seconds_bucket"}
    assert ml.angle_label(35) == ml.angle_label("35.0") == "35"


@pytest.mark.slow
def test_a_worker_shows_its_own_queue_while_it_runs_and_takes_it_away_after(redis_url: str, ray_cluster: str,
                                                                           tmp_path: Path) -> None:
    # Two workers in turn in one process: each exports its own queue's series, not a stale one.
    from prometheus_client import REGISTRY

    from services.config import Settings
    from services.worker.worker import Worker

    def exported_queues() -> list[Any]:
        return [c.queue for c in list(REGISTRY._collector_to_names) if isinstance(c, mq.QueueCollector)]

    for n in range(2):
        worker = Worker(Settings.from_env({"CAPSNET_REDIS_URL": redis_url, "CAPSNET_ARTIFACTS": str(tmp_path),
                                           "CAPSNET_METRICS_PORT": "0", "CAPSNET_OFFLINE": "1"}),
                        worker_id=f"w-{n}")
        running = threading.Thread(target=worker.run, daemon=True)
        running.start()
        wait_until(lambda w=worker: exported_queues() == [w.queue], 60, what=f"worker {n}'s queue on /metrics")
        worker.request_stop()
        running.join(30)
        assert not running.is_alive() and exported_queues() == []
