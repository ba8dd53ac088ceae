"""Every write of an attempt is fenced by its lease token (real redis-server, no mocks):
events of an attempt that lost its lease, a heartbeat after the lease expired, and a
``complete`` that races a cancel request."""

from __future__ import annotations

import time

import pytest

from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys

from ..queue_helpers import CPU, train


@pytest.fixture
def keys():
    return Keys("f:")


@pytest.fixture
def q(client, keys):
    return JobQueue(client, keys, lease_seconds=5)


def _stale_and_new(q):
    """Attempt 1 loses its lease (expired and requeued); attempt 2 holds the job now."""
    q.submit(train())
    old = q.claim("w1", CPU)
    assert q.requeue_expired(now=time.time() + 6) == [old.id]
    new = q.claim("w2", CPU)
    assert new.id == old.id and new.token != old.token
    return old, new


def test_events_of_an_attempt_that_lost_its_lease_are_refused(q):
    old, new = _stale_and_new(q)
    events = q.events
    before = events.length(new.id)
    assert events.publish(old.id, "progress", {"step": 99}, lease_token=old.token) is None
    assert events.log(old.id, "stale attempt speaking", lease_token=old.token) is None
    assert events.log(old.id, "no token at all", lease_token="") is None
    assert events.length(new.id) == before

    written = events.publish(new.id, "progress", {"step": 1}, lease_token=new.token)
    assert written is not None and events.last_id(new.id) == written
    assert events.log(new.id, "current attempt", lease_token=new.token)
    assert [e["data"].get("step", e["data"].get("message")) for _, e in events.read(new.id)[before:]] == \
        [1, "current attempt"]

    assert q.complete(new.id, new.token, {"ok": 1})  # a finished job's token is spent too
    assert events.log(new.id, "after the end", lease_token=new.token) is None
    # without a token the append is unfenced, as before (the CLI, tests, the queue's own notes)
    assert events.log(new.id, "unfenced note") is not None


def test_fenced_append_refuses_instead_of_raising_on_junk_keys(q, client, keys):
    q.submit(train())
    job = q.claim("w", CPU)
    client.delete(keys.events(job.id))
    client.set(keys.events(job.id), "junk")
    assert q.events.log(job.id, "into junk", lease_token=job.token) is None
    client.set(keys.job("j-string"), "junk")
    assert q.events.log("j-string", "no record", lease_token="t") is None
    # the queue's next script for the job moves the bad stream aside and the job carries on
    assert q.report_progress(job.id, job.token, {"step": 1})
    assert q.events.log(job.id, "stream is back", lease_token=job.token) is not None


def test_job_channel_of_a_stale_attempt_writes_no_events(q, redis_url, keys, tmp_path):
    from services.runs.runtime import JobChannel, JobContext

    old, new = _stale_and_new(q)
    before = q.events.length(new.id)
    for token, expected in ((old.token, before), (new.token, before + 2)):
        ctx = JobContext(job_id=old.id, lease_token=token, attempt=1, redis_url=redis_url,
                         redis_prefix=keys.prefix, artifacts=str(tmp_path))
        channel = JobChannel(ctx)
        channel.progress({"type": "step", "epoch": 1, "step": 3, "loss": 0.5})
        channel.log("rank 0 says hello")
        assert q.events.length(new.id) == expected


def test_heartbeat_after_the_lease_expired_is_refused_before_any_requeue(client, keys):
    q = JobQueue(client, keys, lease_seconds=0.3)
    rec = q.submit(train())
    job = q.claim("w1", CPU)
    assert q.renew(job.id, job.token) == "ok"
    expires = q.get(rec.id).lease_expires_at
    time.sleep(0.45)
    # nobody has run requeue_expired: the job is still 'running' under this token ...
    assert q.get(rec.id).state == "running" and q.get(rec.id).lease_token == job.token
    # ... but its lease is over, so the holder must stop rather than resurrect it
    assert q.renew(job.id, job.token) == "lost"
    assert q.get(rec.id).lease_expires_at == expires
    assert q.requeue_expired() == [rec.id]
    again = q.claim("w2", CPU)
    assert again.id == rec.id and q.renew(again.id, again.token) == "ok"


def test_complete_after_a_cancel_request_succeeds_and_drops_the_cancel(q):
    rec = q.submit(train())
    job = q.claim("w", CPU)
    assert q.cancel(rec.id) == "cancel_requested" and q.renew(job.id, job.token) == "cancel_requested"
    assert q.complete(job.id, job.token, {"accuracy": 0.99})

    done = q.get(rec.id)
    assert done.state == "succeeded" and done.result == {"accuracy": 0.99}
    assert not done.cancel_requested
    last = done.transitions[-1]
    assert last["state"] == "succeeded" and last["cancel_dropped"] is True
    assert "cancel dropped, result kept" in last["reason"]
    messages = [e["data"].get("message") for _, e in q.events.read(rec.id) if e["type"] == "log"]
    assert "finished before the cancel request took effect; cancel dropped, result kept" in messages
    assert q.counters()["finished"] == {("train", "capsnet", "succeeded"): 1}
    with pytest.raises(Exception, match="already succeeded"):
        q.cancel(rec.id)
