"""Metrics end to end: a real ``capsctl worker`` process, on a real Ray cluster and Redis, trains
LeNet5 (2 DDP ranks, real MNIST, both test suites) and fails two evals (one retried) while the test reads its
``/metrics`` every half second and a real Prometheus scrapes it, and Ray's own metrics, every
second. Then every panel of both Grafana dashboards is queried from that Prometheus as Grafana
does. Nothing is mocked.

The scenario runs once for the module (fixture ``scenario``: 1.5-2.5 min on a busy 2-core machine,
most of it Ray Train starting up); each test checks one aspect of what it recorded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from services.queue.connection import redis_client
from services.queue.job import JobRecord
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from tests.conftest import free_port
from tests.prometheus_helpers import (
    RULES_DIR,
    PrometheusServer,
    load_panel_queries,
    running_prometheus,
    scrape_job,
)
from tests.test_metrics import Samples, get, scrape

from ..service_helpers import WorkerProcess, service_env, wait_until

pytestmark = pytest.mark.slow

WORKER_ID = "w-metrics"
EPOCHS = 3
TRAIN_JOB = {"kind": "train", "model": "lenet5", "cpu_ranks": 2, "epochs": EPOCHS, "batch_size": 64,
             "train_subset": 6000, "test_subset": 1000, "eval_angles": [0, 35], "lr": 2e-3,
             "eval_suites": ["rotation", "affine"], "name": "metrics-e2e"}
# The angles evaluated at the end: the job's own and the rotation suite's 0, 15, ..., 180.
ANGLES = {"0", "35", *(str(a) for a in range(15, 181, 15))}
SUITES = {"rotation_auc", "affine-mnist"}
# Evals of a checkpoint that does not exist fail in the worker, for real: the first is retried once.
# A missing checkpoint inside the artifact storage (allowed, so it fails and is retried for real).
BAD_EVAL = {"kind": "eval", "angles": [0], "test_subset": 500}
RAY_CPUS = 4  # as service_helpers.ray_cluster

LIVE_SERIES = ("capsnet_train_epoch", "capsnet_train_step", "capsnet_train_loss", "capsnet_train_accuracy_ratio",
               "capsnet_train_learning_rate", "capsnet_train_images_per_second",
               "capsnet_train_epoch_duration_seconds")


@dataclass
class Scenario:
    prom: PrometheusServer
    port: int
    worker_info: dict[str, Any]
    train_id: str
    bad_ids: tuple[str, str]            # (retried once, no retry)
    started: float                      # wall clock at the first submit (for Prometheus queries)
    scrapes: list[tuple[float, Samples]] = field(default_factory=list)  # /metrics every 0.5 s
    train_ended: float = 0.0            # wall clock when the live series had left /metrics
    lingered: Samples = field(default_factory=dict)                   # right after that
    after: Samples = field(default_factory=dict)                      # once all jobs had ended
    ended: float = 0.0
    records: dict[str, JobRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def running(self) -> list[tuple[float, Samples]]:
        """Scrapes that carried the train job's live series."""
        return [(t, s) for t, s in self.scrapes if job_series(s, "capsnet_train_loss", self.train_id)]


def job_series(samples: Samples, name: str, job_id: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for (n, labels), v in samples.items()
            if n == name and dict(labels).get("job_id") == job_id]


def total(samples: Samples, name: str, **match: str) -> float:
    """Sum of a metric's samples whose labels include ``match``."""
    return sum(v for (n, labels), v in samples.items() if n == name and match.items() <= dict(labels).items())


def finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(v) for s in result for _, v in (s["values"] if "values" in s else [s["value"]])]
    return [v for v in values if math.isfinite(v)]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster as ``service_helpers.ray_cluster`` starts it, for this module only, or
    the one already running in this process. (Importing that session fixture here would give this
    module its own session-long instance, and the next module's ``ray.init`` would fail.)"""
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=RAY_CPUS, include_dashboard=True, logging_level="WARNING",
                       configure_logging=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def ray_discovery_file() -> Path:
    """This test session's Ray service discovery file: /tmp/ray/prom_metrics_service_discovery.json is
    a symlink to the newest Ray session's on the machine, and other test runs may share it."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "prom_metrics_service_discovery.json"


@pytest.fixture(scope="module")
def scenario(redis_server: str, ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("metrics_e2e")
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    queue = JobQueue(redis_client(redis_server), Keys("capsnet:"), lease_seconds=6)
    port = free_port()
    sd_file = ray_discovery_file()
    wait_until(sd_file.is_file, 30, what=f"Ray's service discovery file {sd_file}")
    ray_job = {  # deploy/prometheus/prometheus.yml's `ray` job, on this session's file
        "job_name": "ray", "scrape_interval": "2s", "scrape_timeout": "2s",
        "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}],
        # The file names the node's address; tests here only talk to this machine over loopback.
        "relabel_configs": [{"source_labels": ["__address__"], "regex": r".*:(\d+)",
                             "target_label": "__address__", "replacement": "127.0.0.1:$1"}],
    }
    with running_prometheus(tmp / "prom", [scrape_job("capsctl", [f"127.0.0.1:{port}"]), ray_job],
                            rule_files=sorted(RULES_DIR.glob("*.yml"))) as prom:
        env = service_env(redis_server, ray_address, tmp / "artifacts", CAPSNET_METRICS_PORT=str(port))
        worker = WorkerProcess(WORKER_ID, env, tmp / f"{WORKER_ID}.log")
        try:
            info = wait_until(lambda: next((w for w in queue.workers() if w["id"] == WORKER_ID), None), 90,
                              what=f"the worker to register; log:\n{worker.output()[-3000:]}")
            prom.wait_for("capsnet_redis_up")  # Prometheus has the state before any job
            t_ready = time.monotonic()
            started = time.time()
            missing = str(tmp / "artifacts" / "nonexistent" / "checkpoint.pt")
            bad1 = queue.submit({**BAD_EVAL, "source": missing, "max_retries": 1})
            train = queue.submit(dict(TRAIN_JOB))
            bad2 = queue.submit({**BAD_EVAL, "source": missing, "max_retries": 0})
            # Junk in a queue key: the worker's claim dead-letters it (capsnet_dead_lettered_total).
            client.zadd(Keys("capsnet:").queue("normal", 0, 1), {"not-a-job-id": 0})
            sc = Scenario(prom=prom, port=port, worker_info=info, train_id=train.id, bad_ids=(bad1.id, bad2.id),
                          started=started)
            ids = (train.id, bad1.id, bad2.id)
            deadline = time.monotonic() + 240
            while True:
                try:
                    sc.scrapes.append((time.time(), scrape(port)[0]))
                except TimeoutError:  # a starved machine: this sample is missing, the next one counts
                    assert time.monotonic() < deadline, f"/metrics kept timing out\n{worker.output()[-3000:]}"
                    continue
                latest = sc.scrapes[-1][1]
                records = {j: queue.get(j) for j in ids}
                if records[train.id].is_terminal and not sc.train_ended \
                        and not job_series(latest, "capsnet_train_loss", train.id):
                    sc.train_ended, sc.lingered = time.time(), latest
                if all(r.is_terminal for r in records.values()) and sc.train_ended:
                    break
                assert time.monotonic() < deadline, f"jobs did not finish: {records}\n{worker.output()[-3000:]}"
                time.sleep(0.5)
            sc.records = records
            # The worker observes an attempt's run time a moment after recording its outcome.
            attempts = sum(r.attempt for r in records.values())
            end = time.monotonic() + 15
            while total(sc.after, "capsnet_job_run_duration_seconds_count") < attempts and time.monotonic() < end:
                time.sleep(0.2)
                sc.after = scrape(port)[0]
            time.sleep(3)  # a few more Prometheus scrapes of the end state
            sc.ended = time.time()
            sc.timings = {"setup": t_ready - t0, "jobs": time.monotonic() - t_ready}
            yield sc
        finally:
            worker.stop()
            print(f"--- {WORKER_ID} log (tail)\n{worker.output()[-3000:]}")
    client.flushdb()


# --------------------------------------------------------------------------- the jobs themselves

def test_jobs_ran_for_real(scenario: Scenario) -> None:
    print(f"scenario timings: {scenario.timings}")
    records = scenario.records
    train = records[scenario.train_id]
    assert train.state == "succeeded", (train.error, train.traceback)
    assert set(train.result["rotation_accuracy"]) == ANGLES
    assert set(train.result["suite_accuracy"]) == SUITES
    bad1, bad2 = (records[j] for j in scenario.bad_ids)
    assert (bad1.state, bad1.attempt) == ("failed", 2) and "nonexistent" in bad1.error
    assert (bad2.state, bad2.attempt) == ("failed", 1)
    # The worker published where its metrics are.
    assert scenario.worker_info["metrics_url"].endswith(f":{scenario.port}/metrics")


# --------------------------------------------------------------------------- /metrics of the worker

def test_service_series_on_the_metrics_endpoint(scenario: Scenario) -> None:
    scrapes = [s for _, s in scenario.scrapes]
    running = [s for _, s in scenario.running()]
    assert len(running) >= 5, f"only {len(running)} scrapes saw the train job running"
    for s in scrapes:
        assert get(s, "capsnet_redis_up") == 1
        assert get(s, "capsnet_workers_alive") == 1
        assert get(s, "capsnet_ray_cluster_cpus", state="total") == RAY_CPUS
        assert get(s, "capsnet_ray_cluster_gpus", state="total") == 0
    # While the train job ran: it was the running job, the others waited, its ranks held 2 CPUs.
    # (The worker drops the job's series a moment after recording its outcome.)
    done_at = next(t["at"] for t in scenario.records[scenario.train_id].transitions if t["state"] == "succeeded")
    for t, s in scenario.running():
        assert total(s, "capsnet_jobs", state="running") == (1 if t < done_at else 0)
        assert total(s, "capsnet_jobs", state="queued") + total(s, "capsnet_jobs", state="retrying") >= 1
    assert min(get(s, "capsnet_ray_cluster_cpus", state="available") for s in running) <= RAY_CPUS - 2

    end = scenario.after
    assert total(end, "capsnet_jobs", state="succeeded") == 1
    assert total(end, "capsnet_jobs", state="failed") == 2
    assert all(total(end, "capsnet_jobs", state=st) == 0 for st in ("queued", "running", "retrying"))
    assert get(end, "capsnet_jobs_submitted_total", kind="train", model="lenet5") == 1
    assert get(end, "capsnet_jobs_submitted_total", kind="eval", model="-") == 2
    assert get(end, "capsnet_jobs_finished_total", kind="train", model="lenet5", outcome="succeeded") == 1
    assert get(end, "capsnet_jobs_finished_total", kind="eval", model="-", outcome="failed") == 2
    assert get(end, "capsnet_job_retries_total") == 1
    assert get(end, "capsnet_dead_lettered_total") == 1
    assert get(end, "capsnet_lease_expiries_total") == 0
    assert get(end, "capsnet_job_manual_retries_total") == 0
    # Histograms: every claim (train once, evals three times), every attempt by outcome.
    assert get(end, "capsnet_job_queue_wait_seconds_count", kind="train") == 1
    assert get(end, "capsnet_job_queue_wait_seconds_count", kind="eval") == 3
    assert get(end, "capsnet_job_queue_wait_seconds_count", kind="tune") == 0       # exported from 0
    assert get(end, "capsnet_job_queue_wait_seconds_sum", kind="train") > 0          # waited for an eval
    assert get(end, "capsnet_job_run_duration_seconds_count", kind="train", outcome="succeeded") == 1
    assert get(end, "capsnet_job_run_duration_seconds_count", kind="eval", outcome="failed") == 3
    train_seconds = scenario.running()[-1][0] - scenario.running()[0][0]
    assert get(end, "capsnet_job_run_duration_seconds_sum", kind="train", outcome="succeeded") > train_seconds
    assert get(end, "capsnet_job_run_duration_seconds_bucket", kind="eval", outcome="failed", le="+Inf") == 3
    # One train attempt reached its first step: its start-up time was observed once, and it is
    # shorter than the whole run.
    assert get(end, "capsnet_job_startup_seconds_count") == 1
    # (bounded by the attempt's whole run, not by a wall-clock guess: start-up stretches on a loaded machine)
    assert 0 < get(end, "capsnet_job_startup_seconds_sum") < get(
        end, "capsnet_job_run_duration_seconds_sum", kind="train", outcome="succeeded")


def test_training_series_while_the_job_runs_and_removed_after(scenario: Scenario) -> None:
    job = scenario.train_id
    running = [s for _, s in scenario.running()]
    for s in running:
        for name in ("capsnet_train_epoch", "capsnet_train_step", "capsnet_train_loss",
                     "capsnet_train_accuracy_ratio", "capsnet_train_learning_rate",
                     "capsnet_train_images_per_second"):
            (labels, value), = job_series(s, name, job)
            assert labels["model"] == "lenet5" and math.isfinite(value), (name, value)
        assert 1 <= get(s, "capsnet_train_epoch", job_id=job, model="lenet5") <= EPOCHS
        assert 0 < get(s, "capsnet_train_loss", job_id=job, model="lenet5") < 10
        assert 0 <= get(s, "capsnet_train_accuracy_ratio", job_id=job, model="lenet5") <= 1
        assert get(s, "capsnet_train_learning_rate", job_id=job, model="lenet5") == pytest.approx(2e-3)
        assert 0 < get(s, "capsnet_train_images_per_second", job_id=job, model="lenet5") < 1e6
        assert not job_series(s, "capsnet_gpu_memory_used_bytes", job)                  # CPU job
    epochs = [get(s, "capsnet_train_epoch", job_id=job, model="lenet5") for s in running]
    steps = [get(s, "capsnet_train_step", job_id=job, model="lenet5") for s in running]
    assert epochs == sorted(epochs) and epochs[-1] == EPOCHS and len(set(epochs)) >= 2
    assert steps == sorted(steps) and steps[-1] > steps[0]
    losses = [get(s, "capsnet_train_loss", job_id=job, model="lenet5") for s in running]
    assert losses[-1] < losses[0]
    durations = [v for s in running for _, v in job_series(s, "capsnet_train_epoch_duration_seconds", job)]
    assert durations and all(0 < d < 120 for d in durations)

    # Test accuracy per angle: only from the final evaluation (per epoch a run measures its
    # validation split, never the test set), every angle at once.
    def angles(s: Samples) -> dict[str, float]:
        return {lab["angle"]: v for lab, v in job_series(s, "capsnet_test_accuracy_ratio", job)}

    seen = [angles(s) for s in running if angles(s)]
    assert seen and set(seen[0]) == ANGLES and 0 < seen[0]["0"] <= 1
    final = seen[-1]
    assert set(final) == ANGLES
    result = scenario.records[job].result["rotation_accuracy"]
    assert final == pytest.approx(result)            # the gauges carry the job's result
    assert final["0"] > 0.6 and final["35"] < final["0"]   # rotated digits are harder

    # When the job ended its live series left at once; its result stays for a few more scrapes
    # (RESULT_LINGER_SECONDS, then it is dropped too: tests/test_metrics_lifecycle.py).
    for name in LIVE_SERIES:
        assert not job_series(scenario.lingered, name, job), name
    assert angles(scenario.lingered) == pytest.approx(result)

    # The suites' results (rotation AUC, affine-MNIST accuracy) arrive with the final evaluation
    # and linger like the accuracy per angle.
    def suites(s: Samples) -> dict[str, float]:
        return {lab["suite"]: v for lab, v in job_series(s, "capsnet_suite_accuracy_ratio", job)}

    suite_result = scenario.records[job].result["suite_accuracy"]
    assert [suites(s) for s in running if suites(s)][-1] == pytest.approx(suite_result)
    assert suites(scenario.lingered) == pytest.approx(suite_result)
    assert 0.1 < suite_result["rotation_auc"] < final["0"] and 0.1 < suite_result["affine-mnist"] <= 1
    for (name, labels), _ in scenario.after.items():
        assert dict(labels).get("job_id") != job or name in (
            "capsnet_test_accuracy_ratio", "capsnet_suite_accuracy_ratio"), name


# --------------------------------------------------------------------------- Prometheus and Grafana

def test_prometheus_scraped_the_worker_and_ray(scenario: Scenario) -> None:
    prom, at = scenario.prom, scenario.ended
    targets = {t["labels"]["job"]: t for t in prom.targets() if t["health"] == "up"}
    assert {"capsctl", "ray"} <= set(targets), prom.targets()
    window = f"[{int(scenario.ended - scenario.started) + 5}s]"
    job = scenario.train_id
    assert prom.query(f'max_over_time(capsnet_train_epoch{{job_id="{job}"}}{window})', at=at)[0]["value"][1] \
        == str(EPOCHS)
    samples = prom.query(f'count_over_time(capsnet_train_loss{{job_id="{job}"}}{window})', at=at)
    assert int(samples[0]["value"][1]) >= 5                                        # scraped while it ran
    assert prom.query(f'capsnet_train_loss{{job_id="{job}"}}', at=at) == []        # stale once removed
    value = {expr: float(prom.query(expr, at=at)[0]["value"][1]) for expr in (
        'max(capsnet_jobs_finished_total{kind="eval", outcome="failed"})',
        'max(capsnet_jobs_submitted_total{kind="train", model="lenet5"})',
        "sum(capsnet_job_queue_wait_seconds_count)",
        'max(capsnet_ray_cluster_cpus{state="total"})',
    )}
    assert list(value.values()) == [2, 1, 4, RAY_CPUS], value
    # Ray's own metrics, found through Ray's service discovery file, sit beside ours.
    ray_names = {r["metric"]["__name__"] for r in prom.query('count by (__name__) ({job="ray"})', at=at)}
    assert {"ray_tasks", "ray_actors"} <= ray_names, sorted(ray_names)
    assert len({n for n in ray_names if n.startswith("ray_")}) >= 20, sorted(ray_names)


def test_every_dashboard_panel_has_data(scenario: Scenario) -> None:
    """Every panel's PromQL, as Grafana runs it over the scenario's time range, returns finite data
    (only the CUDA-only panels are skipped on this CPU machine)."""
    prom, job = scenario.prom, scenario.train_id
    queries = load_panel_queries(variables={"job_id": job})
    assert len(queries) >= 35
    results, empty = {}, []
    for q in queries:
        if q.cuda_only:
            continue
        result = prom.query_range(q.expr, start=scenario.started - 5, end=scenario.ended, step=1)
        results[(q.panel, q.ref_id)] = result  # (a sweep's panels: the query is checked, no data expected)
        if not finite(result) and not q.tune_only:
            empty.append(f"{q}  ->  {len(result)} series, no finite value")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert [q.panel for q in queries if q.cuda_only] == [
        "GPU memory (peak allocated)", "GPU utilisation (NVML, per device)", "GPU device memory used / total (NVML)"]

    def by(panel: str, label: str, ref: str = "A") -> dict[str, list[float]]:
        return {r["metric"].get(label, ""): finite([r]) for r in results[(panel, ref)]}

    assert set(finite(results[("Running jobs", "A")])) == {0, 1}              # 1 while training, else 0
    assert max(finite(results[("Epoch", "A")])) == EPOCHS
    assert by("Test accuracy over time by angle", "angle").keys() == ANGLES
    assert set(by("Queue wait quantiles", "kind")) == {"train", "eval"}       # tune: never claimed, left out
    runs = {(r["metric"]["kind"], r["metric"]["outcome"]) for r in results[("Run time quantiles", "A")]}
    assert runs == {("train", "succeeded"), ("eval", "failed")}
    assert all(0 <= v <= 1 for v in finite(results[("Failed share of finished jobs (1h)", "A")]))
    assert max(finite(results[("Retries, lease expiries, dead letters", "A")])) > 0
    assert max(finite(results[("Retries, lease expiries, dead letters", "C")])) > 0
    # The bar gauge is an instant query over the dashboard's range: the final accuracy per angle,
    # still shown after the job ended.
    bars = next(q for q in queries if q.panel == "Accuracy by test angle (last value)")
    final = {r["metric"]["angle"]: float(r["value"][1]) for r in prom.query(bars.expr, at=scenario.ended)}
    assert final == pytest.approx(scenario.records[job].result["rotation_accuracy"])
    # The suites' bar gauge likewise: the job's rotation AUC and affine-MNIST accuracy.
    bars = next(q for q in queries if q.panel == "Test suites (last value)")
    final = {r["metric"]["suite"]: float(r["value"][1]) for r in prom.query(bars.expr, at=scenario.ended)}
    assert final == pytest.approx(scenario.records[job].result["suite_accuracy"])


def test_alert_rules_evaluate_without_errors(scenario: Scenario) -> None:
    groups = scenario.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 7
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad
