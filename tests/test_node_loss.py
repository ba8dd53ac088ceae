"""Losing a Ray node under a running job is not the job's fault (issue 9, section 7).

* ``infrastructure_loss`` tells a dead rank process/node from the job's own error, on the real
  Ray Train V2 exception classes that ``trainer.fit()`` raises.
* ``JobQueue.hand_back`` against a real redis-server: fenced, charged to ``max_lost`` (never to
  ``max_retries``), checkpoint kept.
* End to end: a two-node local Ray cluster (``ray.cluster_utils.Cluster``), a real ``capsctl
  worker`` subprocess, a 2-rank LeNet5 DDP job whose ranks can only run on the second node;
  that node is SIGKILLed after a checkpoint. The job (``max_retries=0``) resumes on what is left
  and succeeds, and the cluster's resources are all free again afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayTaskError
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerHealthCheckFailedError,
    WorkerHealthCheckTimeoutError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from services.queue import JobQueue
from services.ray_train import infrastructure_loss

from .service_helpers import WorkerProcess, service_env, wait_until

CPU = {"gpus": 0, "cpus": 8}


def _train(**kw: object) -> dict:
    return {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 64, "test_subset": 64, **kw}


def _rank_died() -> WorkerHealthCheckFailedError:
    """What Ray Train records for a rank whose process or node is gone: its health check (a poll
    task on the rank's actor) failed with the actor's death."""
    return WorkerHealthCheckFailedError("A worker health check failed.", failure=ActorDiedError())


# ---------------------------------------------------------------------------- classification


def test_dead_ranks_are_an_infrastructure_loss() -> None:
    both = WorkerGroupError("ranks died", {0: _rank_died(), 1: _rank_died()})
    reason = infrastructure_loss(both)
    assert reason is not None and reason.startswith("rank(s) 0, 1 lost their Ray process or node (ActorDiedError")
    unavailable = WorkerHealthCheckFailedError("failed", failure=ActorUnavailableError("node unreachable", None))
    assert infrastructure_loss(WorkerGroupError("x", {1: unavailable})) is not None
    node = WorkerHealthCheckFailedError("failed", failure=NodeDiedError("node 1.2.3.4 died"))
    assert "NodeDiedError: node 1.2.3.4 died" in infrastructure_loss(WorkerGroupError("x", {0: node}))
    hung = WorkerHealthCheckTimeoutError("A worker health check has been hanging for 600 s.")
    assert infrastructure_loss(WorkerGroupError("x", {0: hung})) is not None
    # One dead rank wins over the collateral error of its surviving peer.
    collateral = RuntimeError("[gloo] Connection closed by peer")
    assert infrastructure_loss(WorkerGroupError("x", {0: collateral, 1: _rank_died()})).startswith("rank(s) 1 ")
    # The ranks never came up because their node died during start-up.
    startup = ControllerError(WorkerGroupStartupFailedError("One of the worker actors failed to initialize"))
    assert infrastructure_loss(startup).startswith("Ray Train could not start the ranks")
    assert infrastructure_loss(ActorDiedError()) is not None  # the controller actor itself


def test_the_jobs_own_errors_are_not_a_loss() -> None:
    # An exception raised by the training function reaches fit() unwrapped, per rank.
    assert infrastructure_loss(WorkerGroupError("x", {0: ValueError("bad lr"), 1: ValueError("bad lr")})) is None
    # ...even a Ray error the user's code raised itself (it called an actor that had died).
    assert infrastructure_loss(WorkerGroupError("x", {0: ActorDiedError()})) is None
    # A rank actor whose constructor raised is code, not infrastructure.
    init_failed = ActorDiedError(RayTaskError("RayTrainWorker.__init__", "Traceback ...", ImportError("x")))
    assert init_failed.actor_init_failed
    assert infrastructure_loss(WorkerGroupError("x", {0: WorkerHealthCheckFailedError("f", init_failed)})) is None
    assert infrastructure_loss(ControllerError(ValueError("bad config"))) is None
    assert infrastructure_loss(ValueError("not a Ray error")) is None
    assert infrastructure_loss(RuntimeError("evaluation failed")) is None


# ---------------------------------------------------------------------------- queue: hand_back


def test_hand_back_requeues_on_max_lost_not_max_retries(queue: JobQueue) -> None:
    rec = queue.submit(_train(max_retries=0, max_lost=2))
    for attempt in (1, 2):  # with max_retries 0 a lost node still resumes the job
        job = queue.claim("w", CPU)
        assert job.attempt == attempt
        assert queue.set_checkpoint(job.id, job.token, f"/ckpt/{rec.id}/epoch-000{attempt}")
        assert queue.hand_back(job.id, job.token, "rank(s) 0, 1 lost their Ray process or node") == "queued"
        r = queue.get(rec.id)
        assert r.state == "queued" and r.losses == attempt and r.retries_left == 1 and r.lease_token is None
        assert r.checkpoint == f"/ckpt/{rec.id}/epoch-000{attempt}"  # the next attempt resumes there
        assert r.transitions[-1]["reason"] == "infrastructure lost: rank(s) 0, 1 lost their Ray process or node"
        assert r.transitions[-1]["worker"] == "w"
        assert queue.hand_back(job.id, job.token, "again") == "fenced"  # the token is spent
    job = queue.claim("w", CPU)
    assert queue.hand_back(job.id, job.token, "node died") == "failed"  # the third loss: over max_lost 2
    r = queue.get(rec.id)
    assert r.state == "failed" and r.error.startswith("lost its infrastructure 3 times (last: node died on attempt 3")
    assert "max_lost 2" in r.error
    counters = queue.counters()
    assert counters["infrastructure_losses"] == 3 and counters["retries"] == 0


def test_hand_back_is_fenced_and_honours_a_cancel(queue: JobQueue) -> None:
    rec = queue.submit(_train())
    job = queue.claim("w1", CPU)
    assert queue.hand_back(job.id, "not-the-token", "x") == "fenced"
    assert queue.get(rec.id).state == "running"
    assert queue.cancel(rec.id) == "cancel_requested"
    assert queue.hand_back(job.id, job.token, "node died") == "cancelled"
    assert queue.get(rec.id).state == "cancelled"


# ---------------------------------------------------------------------------- a real node loss

# Ray settings of the test cluster: a dead raylet is declared dead after ~2 s, not ~15 s.
_FAST_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}

_CLUSTER_STATE = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    total, free = ray.cluster_resources(), ray.available_resources()
    groups = {k: v["state"] for k, v in ray.util.placement_group_table().items()}
    settled = all(free.get(k, 0) == v for k, v in total.items()) and all(s == "REMOVED" for s in groups.values())
    if settled or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"total": total, "available": free, "placement_groups": groups}))
"""


@pytest.fixture
def two_node_cluster() -> Iterator[object]:
    """A head with no CPUs (the worker's driver and Ray Train's controller live there) and a
    second node with 2 CPUs: a 2-rank CPU job can only run on the second node. The test adds a
    third node itself before it kills the second, so the job has somewhere to resume.

    Nothing is ray.init-ed in this process: it may already be a driver of the session's cluster."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": _FAST_DEATH})
    try:
        cluster.add_node(num_cpus=2, resources={"node2": 2})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _cluster_state(address: str, settle_s: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _CLUSTER_STATE, address, str(settle_s)], capture_output=True,
                         text=True, timeout=settle_s + 60, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_node_loss_resumes_elsewhere_without_using_a_retry(queue: JobQueue, redis_url: str, two_node_cluster,
                                                           tmp_path: Path) -> None:
    cluster = two_node_cluster
    node2 = cluster.list_all_nodes()[1]
    epochs = 4
    job = queue.submit({"kind": "train", "model": "lenet5", "workers": 2, "batch_size": 64, "epochs": epochs,
                        "train_subset": 3000, "test_subset": 300, "eval_angles": [0], "lr": 2e-3,
                        "max_retries": 0})
    env = service_env(redis_url, cluster.address, tmp_path / "artifacts")
    worker = WorkerProcess("w-nodeloss", env, tmp_path / "w-nodeloss.log")
    try:
        # Both ranks are up: on node 2, the only node with CPUs.
        wait_until(lambda: sum("shard_fingerprint" in e["data"] for _, e in queue.events.read(job.id)) == 2, 240,
                   what=f"both ranks to start; worker log:\n{worker.output()[-3000:]}")
        # Somewhere for the job to go once node 2 is gone (it joins while epoch 1 trains).
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        wait_until(lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 240, interval=0.1,
                   what=f"a first checkpoint; worker log:\n{worker.output()[-3000:]}")
        done_before_kill = int(queue.get(job.id).checkpoint.rsplit("-", 1)[1])
        cluster.remove_node(node2, allow_graceful=False)  # SIGKILL its raylet and the ranks with it
        killed_at = time.monotonic()
        assert done_before_kill < epochs

        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                            what=f"the job to finish on what is left; worker log:\n{worker.output()[-3000:]}")
        recovered_s = time.monotonic() - killed_at
        assert record.state == "succeeded", (record.error, record.traceback, worker.output()[-3000:])
        # Charged to max_lost, not to max_retries (0): one loss, no retry, same worker.
        assert record.max_retries == 0 and record.losses == 1 and record.attempt == 2
        assert [t["state"] for t in record.transitions] == ["queued", "running", "queued", "running", "succeeded"]
        handed_back = record.transitions[2]
        assert handed_back["reason"].startswith("infrastructure lost: rank(s) "), handed_back
        assert handed_back["worker"] == "w-nodeloss"
        assert queue.counters()["infrastructure_losses"] == 1 and queue.counters()["retries"] == 0
        # The second attempt resumed from the last checkpoint rather than epoch 0.
        logs = [e["data"] for _, e in queue.events.read(job.id) if e["type"] == "log"]
        assert any("infrastructure_lost" in e for e in logs)
        resumed = [e for e in logs if "resumed_from_epoch" in e]
        assert resumed and resumed[0]["resumed_from_epoch"] >= done_before_kill
        assert [h["epoch"] for h in record.result["history"]] == list(range(1, epochs + 1))
        assert worker.proc.poll() is None  # the worker lived through it and still serves

        # Nothing leaked: every CPU of what is left is free again, no placement group survives.
        state = _cluster_state(cluster.address, settle_s=30)
        assert state["total"].get("CPU") == 2 and "node2" not in state["total"], state
        assert state["available"].get("CPU") == state["total"]["CPU"], state
        assert all(s == "REMOVED" for s in state["placement_groups"].values()), state
        print(f"node loss: {done_before_kill} epoch(s) checkpointed before the kill; succeeded "
              f"{recovered_s:.1f} s after it")
    finally:
        worker.stop()
