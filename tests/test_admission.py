"""Admission with many workers on one Ray cluster (services.worker.admission, Worker._admit).

The fast tests drive the real workers' admission (the Redis lock, the claim script, the
reservation check and the release) against a real Redis, with the Ray cluster's view replaced by
numbers the test controls: GPUs that do not exist here. The slow test runs three real workers
on the shared 4-CPU local Ray.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from services.cli import main
from services.cli.commands_admin import waiting_reason
from services.config import Settings
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.worker.admission import AdmissionLock, reserved, shortfall
from services.worker.worker import ADMISSION_BUSY, Admission, Worker

from .service_helpers import wait_until

# ----------------------------------------------------------------------------- pure decisions

def test_reserved_by_a_new_placement_group_or_by_the_drop_in_free_resources() -> None:
    need = {"gpus": 2, "cpus": 2}
    before = {"gpus": 3.0, "cpus": 8.0}
    group = {"state": "CREATED", "bundles": {0: {"GPU": 1.0, "CPU": 1.0}, 1: {"GPU": 1.0, "CPU": 1.0}}}
    # Ray's view has not caught up, but the job's placement group exists
    assert reserved(need, before, before, [group])
    assert not reserved(need, before, before, [{**group, "state": "PENDING"}])
    assert not reserved(need, before, before, [{"state": "CREATED", "bundles": {0: {"GPU": 1.0, "CPU": 1.0}}}])
    # a Ray task (eval) or Tune's trials: the free resources dropped by the demand
    assert reserved(need, before, {"gpus": 1.0, "cpus": 6.0})
    assert not reserved(need, before, {"gpus": 1.0, "cpus": 7.0})
    assert not reserved(need, before, {"gpus": 2.0, "cpus": 6.0})


def test_shortfall_says_what_is_missing() -> None:
    assert shortfall({"gpus": 2, "cpus": 2}, {"gpus": 1, "cpus": 8}) == "waiting for 2 GPUs; cluster has 1 free"
    assert shortfall({"gpus": 0, "cpus": 2}, {"gpus": 0, "cpus": 1}) == "waiting for 2 CPUs; cluster has 1 free"
    assert shortfall({"gpus": 1, "cpus": 1}, {"gpus": 0.5, "cpus": 4}) == "waiting for 1 GPU; cluster has 0.5 free"
    assert shortfall({"gpus": 0, "cpus": 2}, {"gpus": 0, "cpus": 2}) is None
    assert shortfall({"gpus": 0, "cpus": 2}, None) is None


# ----------------------------------------------------------------------------- the lock

def test_lock_is_exclusive_expires_and_is_released_only_by_its_holder(redis_url: str) -> None:
    client = redis_client(redis_url)
    keys = Keys("capsnet:")
    lock = AdmissionLock(client, keys, ttl_seconds=0.3)
    first = lock.acquire()
    assert first is not None
    assert lock.acquire() is None  # held
    # the holder died mid-admission: its lock expires by itself (Redis's PX, polled)
    second = wait_until(lock.acquire, 5, interval=0.02, what="the dead holder's lock to expire")
    assert not lock.release(first)  # a late release of the expired token leaves the new holder alone
    assert not lock.renew(first)  # nor does a late renewal
    assert client.get(keys.admission) == second
    for _ in range(3):  # a live holder renews: its lock outlives the TTL
        time.sleep(0.2)
        assert lock.renew(second)
    assert client.get(keys.admission) == second
    assert lock.release(second)
    assert client.exists(keys.admission) == 0


@pytest.mark.parametrize("junk", ["list", "no-ttl"])
def test_junk_lock_key_never_blocks_admission(redis_url: str, junk: str) -> None:
    client = redis_client(redis_url)
    keys = Keys("capsnet:")
    if junk == "list":
        client.rpush(keys.admission, "x")
    else:
        client.set(keys.admission, "left by hand")
    token = AdmissionLock(client, keys, ttl_seconds=5).acquire()
    assert token is not None
    assert 0 < client.pttl(keys.admission) <= 5000


# ----------------------------------------------------------------------------- workers, fake GPUs

class FakeCluster:
    """The Ray cluster as the workers see it: free GPUs/CPUs and placement groups the test sets."""

    def __init__(self, gpus: float, cpus: float) -> None:
        self.total = {"GPU": gpus, "CPU": cpus}
        self.free = dict(self.total)
        self.groups: dict[str, dict[str, Any]] = {}
        self.reads = 0  # how often a worker has looked at the placement groups

    def place(self, group_id: str, gpus: int, cpus: int, free_lags: bool = False) -> None:
        """Ray creates a job's placement group: one bundle per rank. ``free_lags``: the free
        counts do not show it yet (``ray.available_resources()`` is the GCS's copy of the
        raylets' reports, which trails the placement-group table; under load by seconds)."""
        self.groups[group_id] = {"state": "CREATED", "bundles": {
            i: {"GPU": 1.0, "CPU": 1.0} for i in range(gpus)} if gpus else {i: {"CPU": 1.0} for i in range(cpus)}}
        if not free_lags:
            self.catch_up(gpus, cpus)

    def catch_up(self, gpus: int, cpus: int) -> None:
        self.free = {"GPU": self.free["GPU"] - gpus, "CPU": self.free["CPU"] - cpus}

    def remove(self, group_id: str, gpus: int, cpus: int) -> None:
        del self.groups[group_id]
        self.free = {"GPU": self.free["GPU"] + gpus, "CPU": self.free["CPU"] + cpus}


class FakeRayWorker(Worker):
    """A real Worker whose reads of Ray come from a FakeCluster (no GPU exists here)."""

    def __init__(self, cluster: FakeCluster, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster

    def _resources(self) -> tuple[dict[str, float], dict[str, float]]:
        return dict(self.cluster.total), dict(self.cluster.free)

    def _placement_groups(self) -> dict[str, dict[str, Any]]:
        self.cluster.reads += 1
        return dict(self.cluster.groups)


def _workers(redis_url: str, tmp_path: Path, cluster: FakeCluster, n: int) -> list[FakeRayWorker]:
    settings = Settings.from_env({"CAPSNET_REDIS_URL": redis_url, "CAPSNET_ARTIFACTS": str(tmp_path),
                                  "CAPSNET_LEASE_SECONDS": "6", "CAPSNET_HEARTBEAT_SECONDS": "1"})
    return [FakeRayWorker(cluster, settings, worker_id=f"w-{i}", admission_timeout_s=5) for i in range(n)]


def _spec(gpus: int, priority: str = "normal") -> dict[str, Any]:
    return {"kind": "train", "model": "lenet5", "gpus": gpus, "epochs": 1, "priority": priority}


def _hold(worker: Worker, admission: Admission) -> threading.Thread:
    """What execute() starts next to the run: the thread that keeps the lock until reservation."""
    thread = threading.Thread(target=worker._hold_admission, args=(admission, threading.Event()), daemon=True)
    thread.start()
    return thread


def test_gpu_jobs_are_admitted_one_at_a_time_by_priority(redis_url: str, tmp_path: Path,
                                                         queue: JobQueue) -> None:
    cluster = FakeCluster(gpus=3, cpus=16)
    w0, w1, w2 = _workers(redis_url, tmp_path, cluster, 3)
    a, b, c = (queue.submit(_spec(2), check_capacity=False) for _ in range(3))

    first = w0._admit()
    assert isinstance(first, Admission) and first.job.job_id == a.id
    # While w0's job is not yet placed, the 3 GPUs still look free: the others must not count them.
    assert w1._admit() is ADMISSION_BUSY and w2._admit() is ADMISSION_BUSY
    holder = _hold(w0, first)
    seen = cluster.reads  # the holder looks at Ray three times and finds nothing new
    wait_until(lambda: cluster.reads >= seen + 3, 10, interval=0.02, what="the holder to read Ray three times")
    assert holder.is_alive()  # nothing reserved yet: the lock stays
    cluster.place("pg-a", gpus=2, cpus=2)
    holder.join(timeout=5)
    assert not holder.is_alive()
    assert any("resources reserved in Ray" in e["data"].get("message", "")
               for _, e in queue.events.read(a.id, "0"))

    # Now the free count excludes a's GPUs: b and c (2 GPUs each) stay queued, and say why.
    assert w1._admit() is None and w2._admit() is None
    assert [queue.get(j.id).state for j in (a, b, c)] == ["running", "queued", "queued"]
    w1._publish()
    record = queue.get(b.id)
    assert waiting_reason(record, queue.workers()) == "waiting for 2 GPUs; cluster has 1 free"
    shown = CliRunner().invoke(main, ["--redis-url", redis_url, "status", b.id])
    assert shown.exit_code == 0 and "waiting for 2 GPUs; cluster has 1 free" in shown.output, shown.output
    shown = CliRunner().invoke(main, ["--redis-url", redis_url, "status", b.id, "--json"])
    assert json.loads(shown.output)["waiting"] == "waiting for 2 GPUs; cluster has 1 free"

    # A high-priority job submitted later is admitted before the older normal ones.
    high = queue.submit(_spec(2, "high"), check_capacity=False)
    low_cpu = queue.submit(_spec(0, "low"), check_capacity=False)  # fits now: backfilled
    backfill = w1._admit()
    assert isinstance(backfill, Admission) and backfill.job.job_id == low_cpu.id
    cluster.place("pg-low", gpus=0, cpus=1)
    _hold(w1, backfill).join(timeout=5)
    cluster.remove("pg-a", gpus=2, cpus=2)  # a finishes
    assert queue.complete(a.id, first.job.token, {})
    nxt = w2._admit()
    assert isinstance(nxt, Admission) and nxt.job.job_id == high.id
    assert queue.get(b.id).state == "queued"


def test_free_counts_that_lag_behind_the_placement_groups_do_not_overcommit(
        redis_url: str, tmp_path: Path, queue: JobQueue) -> None:
    """What the three-worker test met under load: Ray reports a job's
    placement group CREATED before its free CPUs drop. The holder rightly lets go on the group;
    the next worker must not read the stale free count and claim a third 2-rank job on 4 CPUs."""
    cluster = FakeCluster(gpus=0, cpus=4)
    w0, w1, w2 = _workers(redis_url, tmp_path, cluster, 3)
    a, b, c = (queue.submit({**_spec(0), "cpu_ranks": 2}, check_capacity=False) for _ in range(3))
    for worker, job, group in ((w0, a, "pg-a"), (w1, b, "pg-b")):
        admission = worker._admit()
        assert isinstance(admission, Admission) and admission.job.job_id == job.id
        cluster.place(group, gpus=0, cpus=2, free_lags=True)
        _hold(worker, admission).join(timeout=5)
    assert cluster.free["CPU"] == 4  # Ray's free count has not caught up with either group
    assert w2._admit() is None
    assert [queue.get(j.id).state for j in (a, b, c)] == ["running", "running", "queued"]
    # a finishes and its group goes; the free count still shows its CPUs taken: the lower view wins
    cluster.catch_up(0, 4)
    del cluster.groups["pg-a"]
    assert w2._admit() is None
    cluster.free["CPU"] = 2  # the report arrives
    assert isinstance(w2._admit(), Admission)


def test_holder_releases_after_the_timeout_when_no_reservation_shows(redis_url: str, tmp_path: Path,
                                                                      queue: JobQueue) -> None:
    cluster = FakeCluster(gpus=2, cpus=4)
    w0, w1 = _workers(redis_url, tmp_path, cluster, 2)
    w0.admission_timeout_s = 0.5
    job = queue.submit(_spec(1), check_capacity=False)
    admission = w0._admit()
    assert isinstance(admission, Admission) and admission.job.job_id == job.id
    _hold(w0, admission).join(timeout=5)
    assert w1._admit() is None  # the lock is free again; the other job is running, nothing else queued
    messages = [e["data"].get("message", "") for _, e in queue.events.read(job.id, "0")]
    assert any("not seen reserved" in m for m in messages)


# ----------------------------------------------------------------------------- real Ray, real workers

LENET_JOB = {"kind": "train", "model": "lenet5", "cpu_ranks": 2, "epochs": 2, "batch_size": 64,
             "train_subset": 1000, "test_subset": 200, "eval_angles": [0]}


@pytest.mark.slow
def test_three_workers_never_overcommit_the_cluster_and_respect_priority(queue: JobQueue, workers) -> None:
    """4 CPUs, three 2-rank jobs taken by three workers at once: two run, the third waits in Redis
    (queued) until capacity frees; a high-priority job submitted later still goes before it."""
    first = [queue.submit({**LENET_JOB, "name": f"first-{i}"}) for i in range(2)]
    low = queue.submit({**LENET_JOB, "name": "low", "priority": "low"})
    procs = [workers(f"w-adm-{i}") for i in range(3)]
    states: dict[str, str] = {}
    most_running = 0

    def finishing(progress: dict | None) -> bool:
        """Past its last epoch: the job may already have given its ranks back to Ray while the
        worker records the outcome (and another job is then rightly admitted)."""
        progress = progress or {}
        return progress.get("type") == "eval" or (
            progress.get("type") == "epoch" and progress.get("epoch") == LENET_JOB["epochs"])

    def training(record) -> bool:
        """Running and still holding its ranks."""
        return record.state == "running" and not finishing(record.progress)

    def holding(job_id: str) -> tuple[float, float]:
        """From the recorded events: when the job was claimed, and when it stopped holding its
        ranks (its first finishing progress event, else its end)."""
        record = queue.get(job_id)
        ends = [e["at"] for _, e in queue.events.read(job_id, "0")
                if e["type"] == "progress" and finishing(e["data"])]
        return float(record.started_at), min(ends, default=float(record.finished_at))

    def poll() -> dict[str, str]:
        nonlocal most_running
        records = queue.list(limit=20)
        for record in records:
            states[record.id] = record.state
        most_running = max(most_running, sum(training(r) for r in records))
        return states

    def logs() -> str:
        return "\n".join(p.output()[-1500:] for p in procs)

    wait_until(lambda: all(poll().get(j.id) == "running" for j in first), 180, interval=0.1,
               what="the first two jobs to run")
    # No fixed window (under load a first job may even finish within it): the low job cannot be
    # claimed before one of the first two gives its ranks back, many seconds from now, and the
    # recorded claim times below show whether three ever held resources at once.
    high = queue.submit({**LENET_JOB, "name": "high", "priority": "high"})
    jobs = [*first, low, high]
    wait_until(lambda: all(poll().get(j.id) in ("succeeded", "failed") for j in jobs), 600, interval=0.1,
               what="every job to finish")
    records = {j.id: queue.get(j.id) for j in jobs}
    assert all(r.state == "succeeded" for r in records.values()), {i: r.error for i, r in records.items()}
    intervals = {j.id: holding(j.id) for j in jobs}
    for job_id, (claimed, _) in intervals.items():  # at each claim: how many jobs held ranks then
        held = [other for other, (start, end) in intervals.items() if start <= claimed < end]
        assert len(held) <= 2, (job_id, intervals, logs())
    assert most_running <= 2, (most_running, logs())
    assert records[high.id].started_at < records[low.id].started_at
    # Every claim was followed by a reservation seen in Ray before the next admission.
    for job in jobs:
        messages = [e["data"].get("message", "") for _, e in queue.events.read(job.id, "0") if e["type"] == "log"]
        assert any(m.startswith("resources reserved in Ray") for m in messages), messages
