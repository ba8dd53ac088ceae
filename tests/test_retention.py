"""Retention and bounded growth against a real redis-server: finished jobs are pruned (by
``JobQueue.prune``, idle workers' ``Pruner`` and ``capsctl prune``) and Redis memory comes back,
while active jobs are never touched."""

from __future__ import annotations

import json
import secrets
import time

import pytest
from click.testing import CliRunner

from services.cli import main
from services.config import Settings
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.retention import Pruner

from .service_helpers import wait_until
from .test_cli import env, error_lines  # noqa: F401  (env is a fixture)

CPU = {"gpus": 0, "cpus": 8}
SPEC = {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 64, "test_subset": 64}
RESULT = {"rotation_accuracy": {"0": 0.98, "15": 0.95, "35": 0.76}, "world_size": 1, "device": "cpu"}


def finish_all(q: JobQueue, n: int) -> list[str]:
    """Claim and complete the ``n`` oldest queued jobs with the queue's own scripts, pipelined
    (tokens are chosen client-side), so they look exactly like jobs a worker ran."""
    tokens = [secrets.token_hex(12) for _ in range(n)]
    ids: list[str] = []
    for start in range(0, n, 1000):
        pipe = q.client.pipeline(transaction=False)
        for token in tokens[start:start + 1000]:
            q._run("claim", ["w-fast", token, "0", "8", q.lease_seconds, 0], client=pipe)
        ids += [reply[0] for reply in pipe.execute()]
    result = json.dumps(RESULT)
    for start in range(0, n, 1000):
        pipe = q.client.pipeline(transaction=False)
        for job_id, token in zip(ids[start:start + 1000], tokens[start:start + 1000], strict=True):
            q._run("complete", [job_id, token, result], client=pipe)
        assert all(pipe.execute())
    return ids


def used_memory(q: JobQueue) -> int:
    return int(q.client.info("memory")["used_memory"])


@pytest.fixture
def q(redis_url: str) -> JobQueue:
    queue = JobQueue(redis_client(redis_url), Keys("capsnet:"), lease_seconds=30)
    yield queue
    queue.client.close()


def test_prune_10000_finished_jobs_frees_memory_and_leaves_active_jobs(q: JobQueue) -> None:
    started = time.monotonic()
    baseline = used_memory(q)
    finished = [r.id for r in q.submit_many([SPEC] * 10_000, [f"k-{i}" for i in range(10_000)])]
    active = [r.id for r in q.submit_many([{**SPEC, "name": f"active-{i}"} for i in range(10)])]
    assert finish_all(q, 10_000) == finished  # FIFO: the 10 active jobs were submitted last
    full = used_memory(q)
    keys_full = q.client.dbsize()
    assert full - baseline > 20_000_000  # ~7 KB per finished job (record + event stream)

    # not old enough yet: nothing goes
    assert q.prune(3600, limit=500).job_ids == []
    later = time.time() + 7200
    assert q.count_prunable(3600, now=later) == 10_000
    dry = q.prune(3600, limit=500, dry_run=True, now=later)
    assert len(dry.job_ids) == 500 and q.client.exists(q.keys.job(dry.job_ids[0]))

    pruned, calls = 0, 0
    while True:
        batch = q.prune(3600, limit=500, now=later)
        pruned += len(batch.job_ids)
        calls += 1
        if not batch.more:
            break
    assert pruned == 10_000 and calls == 21
    after = used_memory(q)
    assert q.client.dbsize() < 20 < keys_full
    assert not q.client.exists(q.keys.job(finished[0]), q.keys.events(finished[-1]),
                               q.keys.idempotency("k-0"), q.keys.idempotency("k-9999"))
    assert q.client.zcard(q.keys.jobs) == 10
    # back near the baseline: what is left is the 10 queued jobs, the counters, the scripts, and
    # the tables of zsets/the keyspace that once held 10,000 entries (Redis shrinks them lazily;
    # measured 1-2 MB of the ~78 MB)
    assert after - baseline < 0.05 * (full - baseline), (baseline, full, after)
    assert q.counters()["pruned"] == 10_000

    # the active jobs are untouched and still claimable, in order
    assert [r.state for r in (q.get(i) for i in active)] == ["queued"] * 10
    assert [q.claim("w", CPU).id for _ in range(10)] == active
    assert q.claim("w", CPU) is None
    # the freed idempotency key can be used again (a new job)
    assert q.submit(SPEC, idempotency_key="k-0").id not in finished
    print(f"\n10,000 finished jobs: +{(full - baseline) / 1e6:.1f} MB, {keys_full} keys; after prune "
          f"{(after - baseline) / 1e3:+.0f} kB vs baseline; {time.monotonic() - started:.1f} s in all")


def test_prune_never_touches_active_jobs_and_drops_stale_index_entries(q: JobQueue) -> None:
    done = q.submit(SPEC)
    job = q.claim("w", CPU)
    q.complete(job.id, job.token, RESULT)
    running = q.submit(SPEC)
    q.claim("w", CPU)
    retrying = q.submit(SPEC)
    job = q.claim("w", CPU)
    q.fail(job.id, job.token, "boom")
    failed_then_retried = q.submit({**SPEC, "max_retries": 0})
    job = q.claim("w", CPU)
    q.fail(job.id, job.token, "boom")
    queued = q.submit(SPEC)
    q.retry(failed_then_retried.id)  # queued again; a stale 'failed' entry is planted below
    q.client.zadd(q.keys.state("failed", "normal"), {failed_then_retried.id: 1.0, "j-gone0000-0000": 1.0})
    later = time.time() + 100
    batch = q.prune(10, now=later)
    assert batch.job_ids == [done.id] and batch.examined == 3
    assert q.get(done.id) is None
    states = {r.id: q.get(r.id).state for r in (running, retrying, queued, failed_then_retried)}
    assert states == {running.id: "running", retrying.id: "retrying", queued.id: "queued",
                      failed_then_retried.id: "queued"}
    assert q.client.zcard(q.keys.state("failed", "normal")) == 0  # stale entries dropped, jobs kept
    assert q.get(failed_then_retried.id).transitions[-1]["reason"] == "manual retry"


def test_pruner_is_rate_limited_and_off_at_zero_days(q: JobQueue) -> None:
    for _ in range(3):
        q.submit(SPEC)
    finish_all(q, 3)
    # the jobs finished a second before the pruner's "now": a retention of 0.5 s stands in for days
    paced = [1000.0]
    pruner = Pruner(q, 0.5 / 86400, every_s=3600, batch=2, clock=lambda: paced[0],
                    wall_time=lambda: time.time() + 1.0)
    assert pruner.maybe_run() == 2  # a full batch: more may wait, so it comes back within 1 s
    paced[0] += 0.99
    assert pruner.maybe_run() == 0  # rate-limited
    paced[0] += 0.02
    assert pruner.maybe_run() == 1
    assert q.list() == []
    assert not Pruner(q, 0).enabled and Pruner(q, 0).maybe_run() == 0
    assert Settings.from_env({}).retention_days == 30
    assert Settings.from_env({"CAPSNET_RETENTION_DAYS": "0"}).retention_days == 0


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, f"capsctl {' '.join(args)} -> {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output
    return result


def test_capsctl_prune(env: dict[str, str], redis_url: str) -> None:  # noqa: F811
    q = JobQueue.from_settings(Settings.from_env())
    for _ in range(5):
        q.submit(SPEC)
    finish_all(q, 4)  # 4 finished, 1 still queued
    assert run("prune").output.strip() == "removed 0 finished job(s) older than 30d"
    assert "would remove 0" in run("prune", "--older-than", "1h", "--dry-run").output
    # Redis' clock decides the age: wait until it says the 4 are older than 1 s
    wait_until(lambda: q.count_prunable(1.0) == 4, 10, interval=0.05, what="the finished jobs to age 1 s")
    out = json.loads(run("prune", "--older-than", "1s", "--dry-run", "--json").output)
    assert out == {"pruned": 0, "would_prune": 4, "dry_run": True, "older_than_seconds": 1.0}
    assert len(q.list()) == 5
    out = json.loads(run("prune", "--older-than", "1s", "--json").output)
    assert out["pruned"] == 4 and not out["dry_run"]
    assert [r.state for r in q.list()] == ["queued"]
    bad = run("prune", "--older-than", "soon", code=2)
    assert "expected an age such as 7d" in bad.output
    q.client.close()
