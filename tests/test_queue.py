"""The Redis job queue against a real redis-server (tests/conftest.py), no mocks."""

from __future__ import annotations

import json
import threading
import time

import pytest

from services.config import Settings, SettingsError
from services.queue.errors import (
    MAX_ERROR_CHARS,
    MAX_TRACEBACK_CHARS,
    CapacityError,
    IdempotencyConflict,
    JobNotFound,
    JobStateError,
)
from services.queue.job import JobRecord, new_job_id
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.states import JobState
from services.spec.errors import SpecError

from .queue_helpers import CPU, TINY, train


@pytest.fixture
def keys():
    return Keys("t:")


@pytest.fixture
def q(client, keys):
    return JobQueue(client, keys, lease_seconds=5, backoff_base=0.2, backoff_max=0.3)




def test_submit_claim_complete(q):
    rec = q.submit(train(name="first"))
    assert rec.state == "queued" and rec.id.startswith("j-") and rec.name == "first"
    assert rec.spec["model_config"] == TINY and rec.resources == {"gpus": 0, "cpus": 1}
    stored = q.get(rec.id)
    assert stored.state == "queued" and stored.created_at == pytest.approx(rec.created_at)

    job = q.claim("w1", CPU)
    assert job is not None and job.id == rec.id and job.attempt == 1 and job.checkpoint is None
    assert job.spec.model == "capsnet" and job.spec.model_kwargs() == TINY
    assert q.claim("w2", CPU) is None

    running = q.get(rec.id)
    assert running.state == "running" and running.worker == "w1" and running.started_at
    assert running.lease_expires_at == pytest.approx(running.started_at + 5, abs=0.5)
    assert q.renew(job.id, job.token) == "ok"
    assert q.report_progress(job.id, job.token, {"epoch": 1, "step": 10, "loss": 0.5, "accuracy": 0.8})
    assert q.set_checkpoint(job.id, job.token, "file:///tmp/ckpt-1.pt")
    assert q.complete(job.id, job.token, {"accuracy": {"0": 0.98}})

    done = q.get(rec.id)
    assert done.state == "succeeded" and done.result == {"accuracy": {"0": 0.98}}
    assert done.progress["step"] == 10 and done.checkpoint == "file:///tmp/ckpt-1.pt"
    assert [t["state"] for t in done.transitions] == ["queued", "running", "succeeded"]
    assert all(isinstance(t["at"], float) for t in done.transitions)
    assert done.created_at <= done.started_at <= done.finished_at
    assert "lease_token" not in done.to_dict() and json.dumps(done.to_dict())

    events = q.events.read(rec.id)  # the stream starts at the claim (no event at submit)
    assert [e["type"] for _, e in events] == ["state", "progress", "log", "result", "state"]
    assert [e["data"]["state"] for _, e in events if e["type"] == "state"] == ["running", "succeeded"]
    assert 0 < q.client.ttl(q.keys.events(rec.id)) <= q.events_ttl  # the log expires, the record stays
    assert q.client.ttl(q.keys.job(rec.id)) == -1

    assert q.state_counts()[("succeeded", "normal")] == 1
    assert sum(q.state_counts().values()) == 1
    counters = q.counters()
    assert counters["submitted"] == {("train", "capsnet"): 1}
    assert counters["finished"] == {("train", "capsnet", "succeeded"): 1}


def test_priority_then_fifo(q):
    low = q.submit(train(priority="low")).id
    normal = [q.submit(train()).id for _ in range(5)]
    high = q.submit(train(priority="high")).id
    got = []
    while (job := q.claim("w", CPU)) is not None:
        got.append(job.id)
    assert got == [high, *normal, low]


def test_gpu_aware_admission(q):
    big = q.submit(train(gpus=2)).id
    cpu4 = q.submit(train(cpu_ranks=4)).id
    small = q.submit(train()).id
    # 1 GPU, 2 CPUs: neither the 2-GPU job nor the 4-rank job fits; they stay queued and visible
    job = q.claim("w1", {"gpus": 1, "cpus": 2})
    assert job.id == small
    assert q.claim("w1", {"gpus": 1, "cpus": 2}) is None
    assert {r.id for r in q.list(state="queued")} == {big, cpu4}
    assert q.get(big).state == "queued"
    assert q.claim("w0", None) .id == cpu4  # default: any CPU job, no GPU job
    job = q.claim("w2", {"gpus": 2, "cpus": 2})
    assert job.id == big and job.spec.gpus == 2
    assert q.queue_depth() == {"high": 0, "normal": 0, "low": 0}


def test_oldest_fitting_job_wins_across_shapes(q):
    ids = [q.submit(train(workers=w)).id for w in (2, 1, 2, 1)]
    got = [q.claim("w", {"gpus": 0, "cpus": 2}).id for _ in range(4)]
    assert got == ids


def test_idempotent_submit(q):
    a = q.submit(train(), idempotency_key="req-123")
    b = q.submit(train(), idempotency_key="req-123")
    assert a.id == b.id and b.spec["epochs"] == 1
    # the same key with a different spec is an error naming the existing job, and writes nothing
    with pytest.raises(IdempotencyConflict, match=f"already names job {a.id}") as conflict:
        q.submit(train(epochs=5), idempotency_key="req-123")
    assert conflict.value.job_id == a.id
    # defaults filled in by the spec count as the same spec
    assert q.submit(train(max_lost=10), idempotency_key="req-123").id == a.id
    assert q.queue_depth()["normal"] == 1 and len(q.list()) == 1
    assert q.counters()["submitted"] == {("train", "capsnet"): 1}
    c = q.submit(train(), idempotency_key="req-124")
    assert c.id != a.id
    # still the same job after it ran
    job = q.claim("w", CPU)
    q.complete(job.id, job.token, {})
    assert q.submit(train(), idempotency_key="req-123").state == "succeeded"


def test_submit_many_and_invalid_spec(q):
    recs = q.submit_many([train(), train(priority="high"), {"kind": "eval", "source": "j-abcdef12-abcd"}])
    assert [r.priority for r in recs] == ["normal", "high", "normal"]
    assert len({r.id for r in recs}) == 3
    with pytest.raises(SpecError, match="gpus: must be an integer in 0..64"):
        q.submit(train(gpus=100))
    assert q.queue_depth()["normal"] == 2


def test_lease_expiry_requeues_and_keeps_checkpoint(q):
    rec = q.submit(train())
    job = q.claim("w1", CPU)
    assert q.set_checkpoint(job.id, job.token, "file:///ckpt/epoch-3.pt")
    assert q.requeue_expired() == []  # not expired yet
    expired = q.requeue_expired(now=time.time() + 6)
    assert expired == [rec.id]
    assert q.requeue_expired(now=time.time() + 6) == []  # handled once
    r = q.get(rec.id)
    assert r.state == "queued" and r.checkpoint == "file:///ckpt/epoch-3.pt" and r.lease_expiries == 1
    assert r.transitions[-1]["reason"] == "lease expired" and r.transitions[-1]["worker"] == "w1"
    again = q.claim("w2", CPU)
    assert again.id == rec.id and again.attempt == 2 and again.checkpoint == "file:///ckpt/epoch-3.pt"
    assert q.counters()["lease_expiries"] == 1


def test_fencing_stale_worker_changes_nothing(q):
    rec = q.submit(train())
    old = q.claim("w1", CPU)
    q.requeue_expired(now=time.time() + 6)
    new = q.claim("w2", CPU)
    assert new.id == old.id and new.token != old.token
    assert not q.heartbeat(old.id, old.token)  # renew's bool form, which services/worker/worker.py calls
    assert q.renew(old.id, old.token) == "lost"
    assert not q.report_progress(old.id, old.token, {"epoch": 9})
    assert not q.set_checkpoint(old.id, old.token, "file:///stale.pt")
    assert not q.complete(old.id, old.token, {"stale": True})
    assert not q.fail(old.id, old.token, "boom")
    assert not q.mark_cancelled(old.id, old.token)
    assert q.renew(old.id, "") == "lost"
    r = q.get(rec.id)
    assert r.state == "running" and r.worker == "w2" and r.progress is None and r.checkpoint is None
    assert q.report_progress(new.id, new.token, {"epoch": 1})
    n_events = q.events.length(new.id)
    assert q.report_progress(new.id, new.token, {"epoch": 2}, publish=False)
    assert q.events.length(new.id) == n_events and q.get(new.id).progress == {"epoch": 2}
    assert q.complete(new.id, new.token, {"ok": True})
    assert not q.fail(new.id, new.token, "late")  # finished: the token is spent
    assert q.get(rec.id).result == {"ok": True}


def test_lost_workers_use_max_lost_not_max_retries(client, keys):
    q = JobQueue(client, keys, lease_seconds=5, backoff_base=0.01, backoff_max=0.01)
    rec = q.submit(train(max_retries=0, max_lost=2))
    assert rec.max_lost == 2
    for attempt in (1, 2):  # with max_retries 0, losing the worker still resumes the job
        job = q.claim("w", CPU)
        assert job.attempt == attempt
        q.requeue_expired(now=time.time() + 6)
        r = q.get(rec.id)
        assert r.state == "queued" and r.losses == attempt and r.retries_left == 1
    job = q.claim("w", CPU)
    q.requeue_expired(now=time.time() + 6)
    r = q.get(rec.id)
    assert r.state == "failed" and r.lease_expiries == 3
    assert r.error.startswith("lost its worker 3 times (lease expired on attempt 3") and "max_lost 2" in r.error
    assert q.claim("w", CPU) is None
    assert q.counters()["finished"] == {("train", "capsnet", "failed"): 1}
    # a manual retry gives a fresh loss budget too
    q.retry(rec.id)
    job = q.claim("w", CPU)
    q.requeue_expired(now=time.time() + 6)
    assert q.get(rec.id).state == "queued"


def test_job_errors_keep_their_retries_after_lost_workers(client, keys):
    q = JobQueue(client, keys, lease_seconds=5, backoff_base=0.01, backoff_max=0.01)
    rec = q.submit(train(max_retries=1))  # default max_lost 10
    for _ in range(10):
        q.claim("w", CPU)
        q.requeue_expired(now=time.time() + 6)
    assert q.get(rec.id).state == "queued"
    job = q.claim("w", CPU)
    assert job.attempt == 11
    assert q.fail(job.id, job.token, "boom") and q.get(rec.id).state == "retrying"  # retry 1 of 1 left
    time.sleep(0.02)
    job = q.claim("w", CPU)
    q.requeue_expired(now=time.time() + 6)  # the 11th loss: over the budget of 10
    r = q.get(rec.id)
    assert r.state == "failed" and r.error.startswith("lost its worker 11 times")


def test_old_jobs_without_max_lost_get_the_default(q, client, keys):
    rec = q.submit(train(max_retries=0))
    client.hdel(keys.job(rec.id), "max_lost")  # a record written before the field existed
    for _ in range(10):
        q.claim("w", CPU)
        q.requeue_expired(now=time.time() + 6)
    assert q.get(rec.id).state == "queued"
    q.claim("w", CPU)
    q.requeue_expired(now=time.time() + 6)
    assert q.get(rec.id).state == "failed"


def test_heartbeat_extends_lease(q):
    q.submit(train())
    job = q.claim("w", CPU)
    before = q.get(job.id).lease_expires_at
    time.sleep(0.05)
    assert q.renew(job.id, job.token) == "ok"
    after = q.get(job.id).lease_expires_at
    assert after > before
    assert q.requeue_expired(now=before + 0.01) == []
    assert q.get(job.id).state == "running"


def test_retries_with_backoff_then_failed(q):
    rec = q.submit(train(max_retries=2))
    delays = []
    for attempt in (1, 2, 3):
        job = None
        deadline = time.monotonic() + 2
        while job is None and time.monotonic() < deadline:
            job = q.claim("w", CPU)
            if job is None:
                time.sleep(0.02)
        assert job is not None and job.attempt == attempt
        assert q.fail(job.id, job.token, f"RuntimeError: boom {attempt}", f"Traceback ...\n  line {attempt}")
        r = q.get(rec.id)
        if attempt < 3:
            assert r.state == "retrying" and r.not_before > r.retrying_at
            assert q.claim("w", CPU) is None  # not due yet
            delays.append(r.transitions[-1]["delay"])
    assert delays == [pytest.approx(0.2), pytest.approx(0.3)]  # 0.2 * 2**n, capped at 0.3
    r = q.get(rec.id)
    assert r.state == "failed" and r.error == "RuntimeError: boom 3" and "line 3" in r.traceback
    assert [t["state"] for t in r.transitions] == [
        "queued", "running", "retrying", "queued", "running", "retrying", "queued", "running", "failed"]
    assert r.retries_left == 0
    c = q.counters()
    assert c["retries"] == 2 and c["finished"] == {("train", "capsnet", "failed"): 1}


def test_fail_without_retry_then_manual_retry(q):
    rec = q.submit(train(max_retries=2))
    job = q.claim("w", CPU)
    assert q.fail(job.id, job.token, "ValueError: bad data", "tb", retry=False)
    assert q.get(rec.id).state == "failed"
    with pytest.raises(JobStateError, match="already failed"):
        q.cancel(rec.id)
    assert q.client.ttl(q.keys.events(rec.id)) > 0
    r = q.retry(rec.id)
    assert r.state == "queued" and r.error is None and r.attempt == 1
    assert q.client.ttl(q.keys.events(rec.id)) == -1  # the log is kept again
    job = q.claim("w", CPU)
    assert job.attempt == 2
    assert q.fail(job.id, job.token, "again")  # a fresh budget: retries again
    r = q.get(rec.id)
    assert r.state == "retrying"
    assert [t.get("reason") for t in r.transitions if t["state"] == "queued"] == ["submitted", "manual retry"]
    with pytest.raises(JobStateError, match="is retrying; only failed or cancelled"):
        q.retry(rec.id)
    queued = q.submit(train()).id
    with pytest.raises(JobStateError, match="is queued; only failed or cancelled"):
        q.retry(queued)  # already queued: an error, not a silent second enqueue
    assert q.get(queued).transitions[-1].get("reason") == "submitted"
    with pytest.raises(JobNotFound):
        q.retry("j-nope-nope")


def test_cancel_queued_retrying_running(q):
    a = q.submit(train()).id
    assert q.cancel(a) == "cancelled"
    assert q.get(a).state == "cancelled" and q.claim("w", CPU) is None

    b = q.submit(train()).id
    job = q.claim("w", CPU)
    q.fail(job.id, job.token, "flaky")
    assert q.get(b).state == "retrying"
    assert q.cancel(b) == "cancelled"
    time.sleep(0.25)
    assert q.claim("w", CPU) is None  # not promoted from the delayed set

    c = q.submit(train()).id
    job = q.claim("w", CPU)
    assert not q.is_cancel_requested(c)
    assert q.cancel(c) == "cancel_requested"
    assert q.cancel(c) == "cancel_requested"
    assert q.is_cancel_requested(c) and q.get(c).state == "running"
    assert q.renew(job.id, job.token) == "cancel_requested"  # and still holds the lease
    assert q.mark_cancelled(job.id, job.token)
    r = q.get(c)
    assert r.state == "cancelled" and r.cancel_requested
    with pytest.raises(JobStateError, match="already cancelled"):
        q.cancel(c)
    with pytest.raises(JobNotFound):
        q.cancel("j-missing-0000")
    # a cancelled job can be retried
    assert q.retry(a).state == "queued"
    assert q.claim("w", CPU).id == a
    assert q.counters()["finished"][("train", "capsnet", "cancelled")] == 3


def test_cancel_of_running_job_whose_worker_died(q):
    rec = q.submit(train())
    q.claim("w", CPU)
    q.cancel(rec.id)
    q.requeue_expired(now=time.time() + 6)
    assert q.get(rec.id).state == "cancelled"


def test_garbage_in_queue_is_dead_lettered(q, client, keys):
    ok = q.submit(train())  # registers the normal 0:1 shape; its seq is 1
    qk = keys.queue("normal", 0, 1)
    # a member with no hash
    client.zadd(qk, {"ghost": 0})
    # a hash whose spec is not JSON
    client.hset(keys.job("j-bad-json"), mapping={"state": "queued", "priority": "normal", "spec": "{not json",
                                                  "gpus": 0, "cpus": 1, "seq": 0, "kind": "train"})
    client.zadd(qk, {"j-bad-json": 0})
    # valid JSON, but a model that does not exist (only pydantic can tell)
    bad_spec = json.dumps({**train(), "model": "vgg16"})
    client.hset(keys.job("j-bad-model"), mapping={"state": "queued", "priority": "normal", "spec": bad_spec,
                                                   "gpus": 0, "cpus": 1, "seq": 0, "kind": "train",
                                                   "model": "vgg16", "attempt": 0})
    client.zadd(qk, {"j-bad-model": 0})
    # a job key that is not a hash
    client.set(keys.job("j-string"), "junk")
    client.zadd(qk, {"j-string": 0})
    # a queue key of the wrong type, and a garbage shape
    client.lpush(keys.queue("high", 0, 1), "junk")
    client.sadd(keys.shapes("high"), "0:1", "not-a-shape")

    job = q.claim("w", CPU)
    assert job is not None and job.id == ok.id

    reasons = {d.get("job_id"): d["reason"] for d in q.dead_letters(20)}
    assert reasons["ghost"] == "job hash is missing"
    assert reasons["j-bad-json"] == "spec is not valid JSON"
    assert "model: must be one of 'c8cnn', 'capsnet', 'effcaps', 'lenet5', 'resnet' (got 'vgg16')" in reasons["j-bad-model"]
    assert reasons["j-string"] == "job key is not a hash"
    assert any("not a sorted set" in d["reason"] for d in q.dead_letters(20))
    assert all(isinstance(d["at"], float) for d in q.dead_letters(20))
    assert q.get("j-bad-model").state == "failed" and "dead-lettered" in q.get("j-bad-model").error
    assert q.get("j-bad-json").state == "failed"
    assert q.counters()["dead_lettered"] == 5
    assert q.claim("w", CPU) is None
    assert client.sismember(keys.shapes("high"), "not-a-shape") == 0


def test_bytes_that_are_not_utf8_never_reach_the_worker(q, client, keys, redis_url):
    import redis

    raw = redis.Redis.from_url(redis_url)  # no decoding: writes arbitrary bytes
    qk = keys.queue("normal", 0, 1)
    spec = json.dumps(train()).encode()
    raw.hset(keys.job("j-bin-name"), mapping={b"state": b"queued", b"priority": b"normal", b"spec": spec,
                                              b"gpus": b"0", b"cpus": b"1", b"seq": b"0", b"kind": b"train",
                                              b"name": b"\xff\xfe junk"})
    raw.zadd(qk, {b"j-bin-name": 0, b"\xff\xc0-binary-id": 0})
    raw.sadd(keys.shapes("normal"), b"0:1")
    raw.zadd(keys.jobs, {b"j-bin-name": 0})
    good = q.submit(train(name="Überprüfung 漢字 ✓"))
    job = q.claim("w", CPU)
    assert job is not None and job.id == good.id and job.spec.name == "Überprüfung 漢字 ✓"
    reasons = [d["reason"] for d in q.dead_letters(10)]
    assert "job hash holds bytes that are not UTF-8" in reasons and "job hash is missing" in reasons
    assert any(d["job_id"] == "\\xff\\xc0-binary-id" for d in q.dead_letters(10))
    # Readers show what they can: the junk job is listed, failed, its bytes kept as they are
    # (surrogate-escaped, printed as \xNN by the CLI).
    junk = q.get("j-bin-name")
    assert junk.state == "failed" and junk.name.encode("utf-8", "surrogateescape") == b"\xff\xfe junk"
    assert [r.id for r in q.list()] == [good.id, "j-bin-name"]
    assert [r.id for r in q.list(state="failed")] == ["j-bin-name"]
    raw.close()


def test_stale_queue_entry_leaves_job_alone(q, client, keys):
    rec = q.submit(train())
    job = q.claim("w", CPU)
    q.complete(job.id, job.token, {"ok": 1})
    client.zadd(keys.queue("normal", 0, 1), {rec.id: 0})  # someone re-adds a finished job
    assert q.claim("w", CPU) is None
    assert q.get(rec.id).state == "succeeded"
    assert q.dead_letters(1)[0]["reason"] == "stale queue entry: job is succeeded"


def test_requeue_tolerates_junk_in_lease_and_delayed_sets(q, client, keys):
    client.zadd(keys.leases, {"j-ghost": 0})
    client.zadd(keys.delayed, {"j-ghost2": 0})
    assert q.requeue_expired() == []
    assert q.promote_due() == []
    assert q.claim("w", CPU) is None


def test_concurrent_claims_never_share_a_job(client, keys):
    q = JobQueue(client, keys, lease_seconds=30)
    ids = {r.id for r in q.submit_many([train() for _ in range(200)])}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n):
        mine = JobQueue(client, keys, lease_seconds=30)
        while (job := mine.claim(f"w{n}", CPU)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)) == 200
    assert set(claimed) == ids
    assert q.state_counts()[("running", "normal")] == 200


def test_concurrent_requeue_expired_handles_each_job_once(client, keys):
    q = JobQueue(client, keys, lease_seconds=5)
    q.submit_many([train() for _ in range(40)])
    while q.claim("w", CPU):
        pass
    later = time.time() + 6
    results: list[list[str]] = []

    def reaper():
        results.append(JobQueue(client, keys).requeue_expired(now=later, limit=7))

    threads = [threading.Thread(target=reaper) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handled = [i for r in results for i in r]
    while True:
        more = q.requeue_expired(now=later)
        if not more:
            break
        handled += more
    assert len(handled) == len(set(handled)) == 40
    assert all(r.lease_expiries == 1 and r.state == "queued" for r in q.list(limit=100))
    assert q.counters()["lease_expiries"] == 40


def test_wait_for_work(q, client, keys):
    client.delete(keys.notify)
    t0 = time.monotonic()
    assert not q.wait_for_work(0.1)
    assert time.monotonic() - t0 >= 0.09
    timer = threading.Timer(0.1, lambda: q.submit(train()))
    timer.start()
    t0 = time.monotonic()
    assert q.wait_for_work(3)
    assert time.monotonic() - t0 < 1.5
    timer.join()
    assert q.claim("w", CPU) is not None


def test_worker_registry_and_capacity(q):
    assert q.workers() == [] and q.cluster_capacity()["workers"] == 0
    q.submit(train(gpus=8))  # nobody registered: accepted
    q.register_worker("gpu-box", {"hostname": "h1", "pid": 123, "resources": {"gpus": 2, "cpus": 8},
                                  "current_job": None})
    q.register_worker("cpu-box", {"hostname": "h2", "pid": 7, "resources": {"gpus": 0, "cpus": 2}})
    ws = q.workers()
    assert [w["id"] for w in ws] == ["cpu-box", "gpu-box"] and ws[1]["pid"] == 123
    cap = q.cluster_capacity()
    assert (cap["workers"], cap["gpus"], cap["cpus"], cap["max_gpus"]) == (2, 2, 10, 2)
    with pytest.raises(CapacityError, match=r"^gpus: job needs 4 GPU\(s\) .*largest: 2 GPUs"):
        q.submit(train(gpus=4))
    with pytest.raises(CapacityError, match="^cpus: "):
        q.submit(train(cpu_ranks=16, batch_size=128))
    with pytest.raises(CapacityError, match="lower gpus_per_trial or max_concurrent"):
        q.submit({"kind": "tune", "gpus_per_trial": 1, "max_concurrent": 4})
    assert q.submit(train(gpus=2)).state == "queued"
    assert q.submit(train(gpus=4), check_capacity=False).state == "queued"
    q.unregister_worker("gpu-box")
    q.register_worker("cpu-box", {"resources": {"gpus": 0, "cpus": 2}}, ttl=0.1)
    time.sleep(0.15)
    assert q.workers() == []


def test_list_and_state_counts(q):
    a = q.submit(train(priority="high")).id
    b = q.submit(train()).id
    c = q.submit(train(priority="low")).id
    job = q.claim("w", CPU)
    assert job.id == a
    assert [r.id for r in q.list()] == [c, b, a]
    assert [r.id for r in q.list(limit=2)] == [c, b]
    assert {r.id for r in q.list(state="queued")} == {b, c}
    assert [r.id for r in q.list(state="running")] == [a]
    counts = q.state_counts()
    assert set(counts) == {(s, p) for s in JobState for p in ("high", "normal", "low")}
    assert counts[("running", "high")] == 1 and counts[("queued", "normal")] == 1 and counts[("queued", "low")] == 1
    with pytest.raises(ValueError, match="state must be one of"):
        q.list(state="bogus")


def test_events_follow_until_terminal(q):
    rec = q.submit(train())
    job = q.claim("w", CPU)

    def finish():
        time.sleep(0.1)
        q.report_progress(job.id, job.token, {"epoch": 1, "images_per_second": 1234.5})
        q.complete(job.id, job.token, {"accuracy": 0.5})

    t = threading.Thread(target=finish)
    t.start()
    seen = [e for _, e in q.events.follow(rec.id, block_ms=200, timeout=5)]
    t.join()
    assert [e["type"] for e in seen] == ["state", "progress", "result", "state"]
    assert seen[-1]["data"]["state"] == "succeeded"


def test_record_and_ids():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    from services.spec.types import JOB_ID_RE

    assert all(JOB_ID_RE.match(i) for i in ids)
    r = JobRecord.from_hash({"id": "x", "spec": "garbage", "transitions": "{", "attempt": "nan?"})
    assert r.id == "x" and r.spec == {} and r.attempt == 0
    assert r.transitions == [{"invalid": "{"}]  # marked unreadable, not silently dropped


def test_lua_keys_match_python_keys(client, keys):
    script = client.register_script(
        "local P = ARGV[1]\n" + Keys.lua_functions()
        + "return {k_job('a'), k_queue('high', 1, 2), k_state('queued', 'low'), k_leases(), k_idem('x')}")
    assert script(keys=[], args=[keys.prefix]) == [
        keys.job("a"), keys.queue("high", 1, 2), keys.state("queued", "low"), keys.leases, keys.prefix + "idem:x"]


def test_settings_from_env(tmp_path, redis_url):
    s = Settings.from_env({"CAPSNET_REDIS_URL": redis_url, "CAPSNET_REDIS_PREFIX": "x:",
                           "CAPSNET_LEASE_SECONDS": "12", "CAPSNET_STATE_DIR": str(tmp_path)})
    assert (s.redis_prefix, s.lease_seconds, s.heartbeat_seconds, s.state_dir) == ("x:", 12, 5, tmp_path)
    assert s.metrics_port == 9310 and s.ray_address is None and s.data_dir is None
    with pytest.raises(SettingsError, match="CAPSNET_METRICS_PORT: must be an integer"):
        Settings.from_env({"CAPSNET_METRICS_PORT": "abc"})
    with pytest.raises(SettingsError, match="shorter than the lease"):
        Settings.from_env({"CAPSNET_LEASE_SECONDS": "5", "CAPSNET_HEARTBEAT_SECONDS": "5"})
    q = JobQueue.from_settings(s)
    assert q.keys.prefix == "x:" and q.lease_seconds == 12
    assert q.submit(train()).id in {r.id for r in q.list()}
    q.client.close()


def test_errors_and_tracebacks_are_stored_truncated(q):
    rec = q.submit(train(max_retries=0))
    job = q.claim("w", CPU)
    error = "E" * 10 + "x" * 50_000
    tb = "Traceback (most recent call last):\n" + "  frame\n" * 20_000 + "RuntimeError: the real cause\n"
    assert q.fail(job.id, job.token, error, tb)
    r = q.get(rec.id)
    assert len(r.error) <= MAX_ERROR_CHARS and r.error.startswith("EEEEEEEEEEx") and "characters cut" in r.error
    assert len(r.traceback) <= MAX_TRACEBACK_CHARS and r.traceback.endswith("RuntimeError: the real cause\n")
    assert r.traceback.startswith("[") and "characters cut" in r.traceback.splitlines()[0]
    assert len(json.dumps(r.transitions)) < 2000  # the transitions list keeps a short copy only
    small = q.submit(train(max_retries=0))
    job = q.claim("w", CPU)
    assert q.fail(job.id, job.token, "short", "tb\n")
    assert q.get(small.id).error == "short" and q.get(small.id).traceback == "tb\n"


def test_submit_bounds_idempotency_key_and_spec_size(q):
    with pytest.raises(SpecError, match=r"idempotency_key: at most 200 characters allowed \(got 201\)"):
        q.submit(train(), idempotency_key="k" * 201)
    assert q.submit(train(), idempotency_key="k" * 200).state == "queued"
    assert len(q.list()) == 1
    # every spec the schema accepts is far below the 64 KiB bound, so check it with a lower one
    small = JobQueue(q.client, q.keys, max_spec_bytes=300)
    with pytest.raises(SpecError, match=r"spec: \d+ bytes of JSON, more than the 300 allowed"):
        small.submit_many([train(), train(name="x" * 100)])
    assert len(q.list()) == 1  # nothing of the batch was sent
