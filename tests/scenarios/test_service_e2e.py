"""End to end against real services: Redis, a local Ray cluster, `capsctl worker` processes,
Ray Train DDP on real MNIST subsets. Nothing here is mocked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys

from ..service_helpers import wait_until

pytestmark = pytest.mark.slow

LENET_JOB = {"kind": "train", "model": "lenet5", "cpu_ranks": 2, "batch_size": 64, "train_subset": 4000,
             "test_subset": 1000, "eval_angles": [0, 35], "lr": 2e-3}


def _events(queue: JobQueue, job_id: str, type_: str) -> list[dict]:
    return [e["data"] for _, e in queue.events.read(job_id) if e["type"] == type_]


def test_ddp_job_runs_to_success_with_disjoint_shards(queue: JobQueue, workers, redis_url: str) -> None:
    job = queue.submit({**LENET_JOB, "epochs": 2, "name": "e2e"})
    worker = workers("w-e2e")
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 240,
                        what=f"job {job.id} to finish; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    assert [t["state"] for t in record.transitions] == ["queued", "running", "succeeded"]
    result = record.result
    assert result["world_size"] == 2 and result["device"] == "cpu"
    assert set(result["rotation_accuracy"]) == {"0", "35"}
    assert result["rotation_accuracy"]["0"] > 0.6  # 2 epochs on 4,000 images: well above chance
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert Path(result["checkpoint"], "checkpoint.pt").is_file()
    plots = Path(result["checkpoint"]).parent / "plots"
    assert (plots / "accuracy_vs_angle.png").stat().st_size > 5000
    assert (plots / "rotated_digits.png").stat().st_size > 5000
    # Each rank trained on its own half of the data.
    ranks = [e for e in _events(queue, job.id, "log") if "shard_fingerprint" in e]
    assert sorted(e["rank"] for e in ranks) == [0, 1]
    assert ranks[0]["shard_fingerprint"] != ranks[1]["shard_fingerprint"]
    assert all(e["shard_size"] == 2000 for e in ranks)
    # Ranks train at the worker's priority (normal here; not Ray's default nice 15) with one torch thread each.
    worker_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert all(e["nice"] == worker_nice and e["torch_threads"] == 1 for e in ranks), ranks
    # The start-up is explained in the log and measured by rank 0 (the worker's start-up histogram).
    logs = _events(queue, job.id, "log")
    assert any(e["message"].startswith("starting Ray Train: a controller and 2 rank") for e in logs)
    rank0 = next(e for e in ranks if e["rank"] == 0)
    assert 0 < rank0["startup_seconds"] < 600 and "startup_seconds" not in next(e for e in ranks if e["rank"] == 1)
    # Progress was streamed while it ran.
    progress = _events(queue, job.id, "progress")
    assert {"step", "epoch", "eval"} <= {p["type"] for p in progress}

    # The CLI reads the result and the checkpoint back.
    from click.testing import CliRunner

    from services.cli import main

    out = CliRunner().invoke(main, ["--redis-url", redis_url, "results", job.id, "--json"])
    assert out.exit_code == 0, out.output
    parsed = json.loads(out.output)
    assert json.dumps(parsed).count(result["checkpoint"]) >= 1
    assert parsed["result"]["rotation_accuracy"] == result["rotation_accuracy"]


def test_killed_worker_job_resumes_from_its_last_checkpoint(queue: JobQueue, workers) -> None:
    epochs = 5
    # max_retries 0: losing the worker is not the job's fault, so it resumes anyway (max_lost)
    job = queue.submit({**LENET_JOB, "epochs": epochs, "train_subset": 12000, "max_retries": 0})
    first = workers("w-doomed")
    # Wait for at least one finished epoch (its checkpoint recorded) but not the end.
    wait_until(lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 240,
               interval=0.1, what=f"a first checkpoint; log:\n{first.output()[-3000:]}")
    done_before_kill = int(queue.get(job.id).checkpoint.rsplit("-", 1)[1])
    first.kill()
    assert done_before_kill < epochs

    second = workers("w-rescuer")
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                        what=f"the job to finish elsewhere; log:\n{second.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    assert record.attempt == 2 and record.worker == "w-rescuer"
    assert record.lease_expiries == 1
    states = [t["state"] for t in record.transitions]
    assert states.count("succeeded") == 1  # never run twice to completion
    # The second attempt started after the checkpointed epochs: none of them was redone.
    resumed = [e for e in _events(queue, job.id, "log") if "resumed_from_epoch" in e]
    assert resumed and resumed[0]["resumed_from_epoch"] >= done_before_kill
    attempt_starts = [i for i, (_, e) in enumerate(queue.events.read(job.id))
                      if e["type"] == "state" and e["data"].get("state") == "running"]
    second_attempt = [e["data"] for _, e in queue.events.read(job.id)[attempt_starts[-1]:]
                      if e["type"] == "progress" and e["data"]["type"] == "epoch"]
    assert second_attempt and min(p["epoch"] for p in second_attempt) == resumed[0]["resumed_from_epoch"] + 1
    assert [h["epoch"] for h in record.result["history"]] == list(range(1, epochs + 1))


def test_cancel_running_job_frees_ray_resources(queue: JobQueue, workers) -> None:
    import ray

    job = queue.submit({**LENET_JOB, "epochs": 200, "train_subset": 20000})
    worker = workers("w-cancel")
    wait_until(lambda: (r := queue.get(job.id)) and r.progress and r.state == "running", 240,
               what=f"training progress; log:\n{worker.output()[-3000:]}")
    assert ray.available_resources().get("CPU", 0) <= 2  # the two ranks hold their CPUs
    assert queue.cancel(job.id) == "cancel_requested"  # it runs: the worker must act on the request
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 60,
                        what="the job to stop")
    assert record.state == "cancelled"
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 4, 30, what="Ray to free the ranks' CPUs")


def test_failing_job_is_retried_then_failed_and_worker_keeps_serving(queue: JobQueue, workers,
                                                                      redis_url: str, tmp_path: Path) -> None:
    # An eval of a checkpoint that does not exist (inside the artifact storage, so an allowed
    # source) fails in the worker, for real.
    missing = str(tmp_path / "artifacts" / "nonexistent" / "checkpoint.pt")
    bad = queue.submit({"kind": "eval", "source": missing, "angles": [0], "max_retries": 1})
    # Junk pushed straight into a queue key must not crash the worker.
    client = redis.Redis.from_url(redis_url)
    client.zadd(Keys("capsnet:").queue("normal", 0, 1), {"not-a-job-id": 0})
    workers("w-retry")
    record = wait_until(lambda: (r := queue.get(bad.id)) and r.state == "failed" and r, 120,
                        what="the eval job to fail twice")
    assert record.attempt == 2
    assert "retrying" in [t["state"] for t in record.transitions]
    assert "nonexistent" in record.error and "Traceback" in record.traceback
    # each failed attempt carries its typed cause (a plain exception of the run: unknown)
    assert record.cause == "unknown"
    assert [t.get("cause") for t in record.transitions if t["state"] in ("retrying", "failed")] == ["unknown"] * 2
    assert queue.dead_letters()
    # The worker still serves: retry the failed job and watch it run (and fail) again.
    queue.retry(bad.id)
    wait_until(lambda: (r := queue.get(bad.id)) and r.state == "failed" and r.attempt >= 3, 120,
               what="the retried job to run again")


def test_a_job_past_its_time_limit_is_stopped_and_fails_without_a_retry(queue: JobQueue, workers) -> None:
    """`--time-limit` (sbatch --time): a job still training past it is stopped, fails with cause
    time_limit and no retry spent, its resources are freed and the worker takes the next job."""
    slow = queue.submit({**LENET_JOB, "cpu_ranks": 1, "epochs": 200, "max_retries": 2, "time_limit_s": 20})
    after = queue.submit({**LENET_JOB, "cpu_ranks": 1, "epochs": 1, "train_subset": 1000})
    worker = workers("w-limit")
    record = wait_until(lambda: (r := queue.get(slow.id)) and r.is_terminal and r, 300,
                        what=f"the time-limited job to end; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "failed" and record.cause == "time_limit", (record.state, record.error)
    assert record.attempt == 1 and "retrying" not in [t["state"] for t in record.transitions]
    assert "time limit" in record.error
    started = next(t["at"] for t in record.transitions if t["state"] == "running")
    ended = next(t["at"] for t in record.transitions if t["state"] == "failed")
    assert 20 <= ended - started < 150  # stopped soon after the limit, long before 200 epochs
    epochs = [e for e in _events(queue, slow.id, "progress") if e.get("type") == "epoch"]
    assert len(epochs) < 200
    nxt = wait_until(lambda: (r := queue.get(after.id)) and r.is_terminal and r, 240,
                     what=f"the next job to run; worker log:\n{worker.output()[-3000:]}")
    assert nxt.state == "succeeded", nxt.error


def test_an_eval_past_its_time_limit_or_cancelled_is_stopped_and_its_task_killed(queue: JobQueue, workers,
                                                                                 tmp_path: Path) -> None:
    """An eval runs as one Ray task: past --time-limit it is killed and the job fails (time_limit,
    no retry); a cancel stops it too; its CPU goes back to Ray and the next job runs."""
    import ray

    from capsnet_core import build_model
    from capsnet_core.checkpoint import save_checkpoint

    # A full-size CapsNet at 30 angles of the whole test set: many minutes of work on a CPU.
    capsnet = save_checkpoint(tmp_path / "artifacts" / "given" / "capsnet.pt", build_model("capsnet"))
    lenet = save_checkpoint(tmp_path / "artifacts" / "given" / "lenet5.pt", build_model("lenet5"))
    heavy = {"kind": "eval", "source": str(capsnet), "angles": list(range(-174, 180, 12))}
    limited = queue.submit({**heavy, "time_limit_s": 5, "max_retries": 2})
    cancelled = queue.submit(heavy)
    quick = queue.submit({"kind": "eval", "source": str(lenet), "angles": [0], "test_subset": 200})
    worker = workers("w-eval-limit")
    record = wait_until(lambda: (r := queue.get(limited.id)) and r.is_terminal and r, 240,
                        what=f"the time-limited eval to end; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "failed" and record.cause == "time_limit", (record.state, record.error)
    assert record.attempt == 1 and "time limit" in record.error
    started = next(t["at"] for t in record.transitions if t["state"] == "running")
    ended = next(t["at"] for t in record.transitions if t["state"] == "failed")
    assert 5 <= ended - started < 60
    wait_until(lambda: queue.get(cancelled.id).state == "running", 120, what="the second eval to start")
    queue.cancel(cancelled.id)
    record = wait_until(lambda: (r := queue.get(cancelled.id)) and r.is_terminal and r, 120,
                        what=f"the cancelled eval to end; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "cancelled", (record.state, record.error)
    record = wait_until(lambda: (r := queue.get(quick.id)) and r.is_terminal and r, 240,
                        what=f"the next eval to run; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "succeeded", record.error
    # the killed tasks hold no CPU any more
    wait_until(lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], 60,
               what="Ray to get the killed eval tasks' CPUs back")
