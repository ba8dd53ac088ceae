"""Losing a Ray node under a running job is not the job's fault.

* ``infrastructure_loss`` tells a dead rank process/node from the job's own error, on the real
  Ray Train V2 exception classes that ``trainer.fit()`` raises.
* ``JobQueue.hand_back`` against a real redis-server: fenced, charged to ``max_lost`` (never to
  ``max_retries``), checkpoint kept.
* End to end: a two-node local Ray cluster (``ray.cluster_utils.Cluster``), a real ``capsctl
  worker`` subprocess, a 2-rank LeNet5 DDP job whose ranks can only run on the second node;
  that node is SIGKILLed after a checkpoint. The job (``max_retries=0``) resumes on what is left
  and succeeds, and the cluster's resources are all free again afterwards.
* Tune jobs the same way: ``trial_loss`` on the errors Tune records for a trial, and a real
  two-trial LeNet5 sweep whose node is SIGKILLed is handed back (``max_lost``) and resumed.
* A rank failure that arrives before Ray noticed the dead node (``node_loss``): a real node of a
  local cluster is killed while a driver waits for Ray to declare it dead.
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
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerHealthCheckFailedError,
    WorkerHealthCheckTimeoutError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from services.queue.jobqueue import JobQueue
from services.runs.losses import infrastructure_loss, trial_loss

from ..service_helpers import WorkerProcess, service_env, wait_until

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


def _raised_in_task(error: BaseException) -> RayTaskError:
    """What Tune records when the trainable itself raised ``error``: a ``RayTaskError`` that is an
    instance of the cause's class too."""
    return RayTaskError("_trial", "Traceback ...", error).as_instanceof_cause()


def test_tune_trials_whose_actor_died_are_a_loss() -> None:
    # The trial's actor (and its node) is gone: Tune records the bare actor error.
    assert trial_loss(ActorDiedError()).startswith("ActorDiedError")
    assert trial_loss(ActorUnavailableError("node unreachable", None)) is not None
    assert trial_loss(NodeDiedError("node 1.2.3.4 died")) == "NodeDiedError: node 1.2.3.4 died"
    assert trial_loss(WorkerCrashedError()) is not None
    # gpus_per_trial > 1: the trial's own Ray Train run lost its ranks.
    lost_ranks = _raised_in_task(WorkerGroupError("ranks died", {0: _rank_died(), 1: _rank_died()}))
    assert trial_loss(lost_ranks).startswith("rank(s) 0, 1 lost their Ray process or node")


def test_a_trials_own_error_is_not_a_loss() -> None:
    assert trial_loss(_raised_in_task(ValueError("bad lr"))) is None
    own = _raised_in_task(ActorDiedError())  # the trainable called a dead actor of its own
    assert isinstance(own, ActorDiedError) and trial_loss(own) is None
    assert trial_loss(_raised_in_task(WorkerGroupError("x", {0: ValueError("bad lr")}))) is None
    assert trial_loss(_raised_in_task(ControllerError(ValueError("bad config")))) is None
    init_failed = ActorDiedError(RayTaskError("ImplicitFunc.__init__", "Traceback ...", ImportError("x")))
    assert trial_loss(init_failed) is None
    assert trial_loss("Failure # 1 ... ActorDiedError") is None  # only the text: not enough to tell
    assert trial_loss(None) is None


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
        # The same hand-back again under the spent token (a reply lost, a WAIT timed out): the
        # same answer, nothing counted twice; any other outcome with it stays fenced out.
        assert queue.hand_back(job.id, job.token, "again") == "queued"
        assert queue.get(rec.id).losses == attempt and not queue.complete(job.id, job.token, {})
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


@pytest.fixture
def two_node_cluster() -> Iterator[object]:
    """A head with no CPUs (the worker's driver and Ray Train's controller live there) and two
    nodes with 2 CPUs each: a 2-rank CPU job runs on one of them (Ray Train packs the ranks), and
    the other is what is left when the test kills that one.

    Nothing is ray.init-ed in this process (it may already be a driver of the session's cluster):
    the worker subprocess is the only driver, and it reports what Ray sees in its registration."""
    cluster = _cpu_less_head_cluster()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_node_loss_resumes_elsewhere_without_using_a_retry(queue: JobQueue, redis_url: str, two_node_cluster,
                                                           tmp_path: Path) -> None:
    cluster = two_node_cluster
    epochs = 4
    job = queue.submit({"kind": "train", "model": "lenet5", "cpu_ranks": 2, "batch_size": 64, "epochs": epochs,
                        "train_subset": 2000, "test_subset": 200, "eval_angles": [0], "lr": 2e-3,
                        "max_retries": 0})
    env = service_env(redis_url, cluster.address, tmp_path / "artifacts")
    worker = WorkerProcess("w-nodeloss", env, tmp_path / "w-nodeloss.log")
    try:
        ranks = wait_until(lambda: (r := [e["data"] for _, e in queue.events.read(job.id)
                                          if "shard_fingerprint" in e["data"]]) and len(r) == 2 and r, 240,
                           what=f"both ranks to start; worker log:\n{worker.output()[-3000:]}")
        rank_nodes = {e["rank"]: e["node_id"] for e in ranks}
        doomed = next(n for n in cluster.list_all_nodes() if n.node_id == rank_nodes[0])
        assert doomed is not cluster.head_node  # the head has no CPUs: no rank can run there
        wait_until(lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 240, interval=0.1,
                   what=f"a first checkpoint; worker log:\n{worker.output()[-3000:]}")
        done_before_kill = int(queue.get(job.id).checkpoint.rsplit("-", 1)[1])
        cluster.remove_node(doomed, allow_graceful=False)  # SIGKILL its raylet and the ranks with it
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
        # The second attempt ran on what is left and resumed from the last checkpoint, not epoch 0.
        logs = [e["data"] for _, e in queue.events.read(job.id) if e["type"] == "log"]
        assert any("infrastructure_lost" in e for e in logs)
        second = [e["node_id"] for e in logs if "shard_fingerprint" in e][2:]
        assert len(second) == 2 and doomed.node_id not in second
        resumed = [e for e in logs if "resumed_from_epoch" in e]
        assert resumed and resumed[0]["resumed_from_epoch"] >= done_before_kill
        assert [h["epoch"] for h in record.result["history"]] == list(range(1, epochs + 1))
        assert worker.proc.poll() is None  # the worker lived through it and still serves

        # Nothing leaked: as the worker's Ray driver sees it, every CPU of what is left is free
        # again (a placement group or rank actor left behind would hold some).
        def settled() -> dict | None:
            info = next((w for w in queue.workers() if w.get("id") == "w-nodeloss"), None)
            return info if info and info["resources"]["cpus"] == 2 and info["available"]["cpus"] == 2 else None

        wait_until(settled, 30, what=f"the cluster's CPUs to be free again: {queue.workers()}")
        print(f"node loss: ranks on {sorted(set(rank_nodes.values()))}, {done_before_kill} epoch(s) checkpointed "
              f"before the kill; succeeded {recovered_s:.1f} s after it")
    finally:
        worker.stop()


# ---------------------------------------------------------------------------- a rank error before the node's death

_NODE_LOSS_DRIVER = """
import json, sys, time
import ray
from ray.train.v2.api.exceptions import WorkerGroupError
from services.runs.losses import node_loss

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
doomed, head = sys.argv[2], sys.argv[3]
# What the surviving rank of a 2-node DDP job reports when its peer's node dies.
collateral = WorkerGroupError("rank failed", {1: RuntimeError("[gloo] Connection closed by peer")})
before = node_loss(collateral, {doomed, head}, grace_s=0)
print("RESULT", json.dumps({"ready": True, "before": before}), flush=True)
sys.stdin.readline()  # the test kills the node now
started = time.monotonic()
after = node_loss(collateral, {doomed, head}, grace_s=60)
waited = time.monotonic() - started
print("RESULT", json.dumps({"after": after, "waited": waited, "own": node_loss(ValueError("x"), {doomed, head}),
                  "other_nodes": node_loss(collateral, {head}, grace_s=0)}), flush=True)
"""


@pytest.mark.slow


def _cpu_less_head_cluster():  # -> ray.cluster_utils.Cluster
    """A real local Ray cluster whose head has no CPUs (work lands on the nodes a test adds and
    kills), with node death detected fast."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": _FAST_DEATH})


def test_a_collective_error_counts_as_lost_once_ray_declares_the_node_dead() -> None:
    cluster = _cpu_less_head_cluster()
    driver = None
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        driver = subprocess.Popen([sys.executable, "-c", _NODE_LOSS_DRIVER, cluster.address, doomed.node_id,
                                   cluster.head_node.node_id], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=Path(__file__).resolve().parents[2])
        def result() -> dict:  # Ray may print to stdout too
            for line in driver.stdout:
                if line.startswith("RESULT "):
                    return json.loads(line.split(" ", 1)[1])
            raise AssertionError(f"the driver ended without a result (exit status {driver.wait()})")

        first = result()
        assert first == {"ready": True, "before": None}  # both nodes alive: the job's own error
        cluster.remove_node(doomed, allow_graceful=False)  # SIGKILL its raylet
        driver.stdin.write("\n")
        driver.stdin.flush()
        second = result()
        assert second["after"].startswith(f"Ray node(s) {doomed.node_id[:8]} of the attempt's ranks died (a rank "
                                          f"reported RuntimeError: [gloo] Connection closed by peer)"), second
        assert second["waited"] < 30  # declared dead within a few health checks, not the whole grace
        assert second["own"] is None  # not a rank failure: never a node's fault
        assert second["other_nodes"] is None  # a dead node the attempt did not use is not its loss
    finally:
        if driver is not None:
            driver.kill()
            driver.wait()
        cluster.shutdown()


# ---------------------------------------------------------------------------- a tune job loses its node


@pytest.mark.slow
def test_tune_trials_lost_with_their_node_resume_without_using_a_retry(queue: JobQueue, redis_url: str,
                                                                      tmp_path: Path) -> None:
    """A head with no CPUs and one 2-CPU node: both trials of the sweep run there. That node is
    SIGKILLed once a trial has checkpointed, then a fresh node joins: the job is handed back
    (``max_lost``, not ``max_retries`` 0) and the second attempt resumes both trials there."""
    cluster = _cpu_less_head_cluster()
    worker = None
    try:
        doomed = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        epochs = 12
        job = queue.submit({"kind": "tune", "models": ["lenet5"], "angles": [0], "eval_angles": [0], "seeds": 2,
                            "epochs": epochs, "train_subset": 400, "test_subset": 100, "batch_size": 32,
                            "lr": [2e-3], "asha": False, "max_concurrent": 2, "max_retries": 0})
        env = service_env(redis_url, cluster.address, tmp_path / "artifacts")
        worker = WorkerProcess("w-tuneloss", env, tmp_path / "w-tuneloss.log")

        def trial_epochs() -> list[dict]:
            return [e["data"] for _, e in queue.events.read(job.id, count=10_000)
                    if e["type"] == "progress" and e["data"].get("type") == "trial" and e["data"].get("epoch")]

        wait_until(trial_epochs, 300, interval=0.1, what=f"a trial's first epoch; worker log:\n{worker.output()[-3000:]}")
        cluster.remove_node(doomed, allow_graceful=False)  # SIGKILL its raylet and both trials with it
        handed_back = wait_until(lambda: (r := queue.get(job.id)) and r.losses == 1 and r, 180,
                                 what=f"the job to be handed back; worker log:\n{worker.output()[-3000:]}")
        assert handed_back.transitions[2]["state"] == "queued"
        assert not any(e["status"] == "finished" for e in trial_epochs())  # the kill came mid-sweep
        cluster.add_node(num_cpus=2)
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                            what=f"the job to finish on the new node; worker log:\n{worker.output()[-3000:]}")
        assert record.state == "succeeded", (record.error, record.traceback, worker.output()[-3000:])
        assert record.max_retries == 0 and record.losses == 1 and record.attempt == 2
        assert [t["state"] for t in record.transitions] == ["queued", "running", "queued", "running", "succeeded"]
        reason = record.transitions[2]["reason"]
        assert reason.startswith("infrastructure lost: ") and "tune trials lost their Ray actor or node" in reason
        assert queue.counters()["infrastructure_losses"] == 1 and queue.counters()["retries"] == 0
        # The second attempt resumed the trials from their checkpoints, and the matrix is complete.
        statuses = [e["data"] for _, e in queue.events.read(job.id, count=10_000)
                    if e["type"] == "progress" and e["data"].get("type") == "trial"]
        assert any(s["status"] == "resumed" and s["resumed_from_epoch"] >= 1 for s in statuses)
        assert len(record.result["trials"]) == 2
        assert all(t["status"] == "finished" and t["epochs_trained"] == epochs for t in record.result["trials"])
        assert record.result["models"]["lenet5"]["n"] == [[2]]
        assert worker.proc.poll() is None  # the worker lived through it and still serves
    finally:
        if worker is not None:
            worker.stop()
        cluster.shutdown()
