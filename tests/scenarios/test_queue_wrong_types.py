"""A key of the wrong type never makes a queue script half-apply (real redis-server, no mocks).

A Redis script that raises keeps the writes it made before the error. Every script therefore
checks the type of each key it touches before its first write, and moves a bad key aside
(``<prefix>quarantine:<key>:<ms>``, with a dead letter saying why) instead of raising.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.states import JobState

from ..queue_helpers import CPU, train


@pytest.fixture
def keys():
    return Keys("t:")


@pytest.fixture
def q(client, keys):
    return JobQueue(client, keys, lease_seconds=5, backoff_base=0.2, backoff_max=0.3)


def quarantined(client, keys: Keys, key: str) -> list[str]:
    """Names of the quarantine keys a bad ``key`` was moved to."""
    return sorted(client.scan_iter(match=keys.quarantine(key, "*")))


# ---------------------------------------------------------------- the three reported cases


def test_events_key_of_wrong_type_is_moved_aside_and_the_job_runs(q, client, keys):
    rec = q.submit(train())
    client.hset(keys.events(rec.id), mapping={"not": "a stream"})

    job = q.claim("w1", CPU)  # raised WRONGTYPE after marking the job running, before the fix
    assert job is not None and job.id == rec.id and job.attempt == 1
    running = q.get(rec.id)
    assert running.state == "running" and running.lease_token == job.token
    assert client.zscore(keys.leases, rec.id) is not None
    assert [e["data"]["state"] for _, e in q.events.read(rec.id)] == ["running"]

    [moved] = quarantined(client, keys, keys.events(rec.id))
    assert client.hgetall(moved) == {"not": "a stream"}
    [letter] = q.dead_letters(10)
    assert letter["job_id"] == rec.id and letter["source"] == keys.events(rec.id)
    assert letter["reason"] == f"a hash where a stream belongs; moved to {moved}"

    assert q.complete(job.id, job.token, {"ok": 1})
    assert q.get(rec.id).state == "succeeded" and q.claim("w2", CPU) is None


def test_state_index_of_wrong_type_never_loses_the_job(q, client, keys):
    client.set(keys.state("running", "normal"), "junk")
    rec = q.submit(train())

    job = q.claim("w1", CPU)  # left the job 'queued' in no queue, before the fix
    assert job is not None and job.id == rec.id
    assert q.get(rec.id).state == "running"
    assert client.zscore(keys.state("running", "normal"), rec.id) is not None
    assert client.zscore(keys.state("queued", "normal"), rec.id) is None
    [moved] = quarantined(client, keys, keys.state("running", "normal"))
    assert client.get(moved) == "junk"
    assert "a string where a zset belongs" in q.dead_letters(1)[0]["reason"]


@pytest.mark.parametrize("which", ["leases", "delayed"])
def test_leases_or_delayed_of_wrong_type_never_stop_claims(q, client, keys, which):
    # a running job (lease in `leases`) and a retrying one (backoff in `delayed`) exist already
    running = q.submit(train())
    held = q.claim("w1", CPU)
    retrying = q.submit(train())
    failing = q.claim("w1", CPU)
    assert q.fail(failing.id, failing.token, "boom") and q.get(retrying.id).state == "retrying"
    client.delete(getattr(keys, which))
    client.set(getattr(keys, which), "junk")

    fresh = q.submit(train())
    job = q.claim("w2", CPU)  # every claim raised WRONGTYPE, before the fix
    assert job is not None and job.id == fresh.id
    [moved] = quarantined(client, keys, getattr(keys, which))
    assert client.get(moved) == "junk"

    # the index was rebuilt from the state index, so neither older job is stranded
    assert q.requeue_expired(now=time.time() + 6) == [running.id, fresh.id]
    assert q.get(held.id).state == "queued"
    assert q.promote_due(now=time.time() + 60) == [retrying.id]
    assert q.get(retrying.id).state == "queued"


def test_dead_letter_list_and_counters_of_wrong_type_are_moved_aside_first(q, client, keys):
    client.set(keys.dead_letters, "junk")
    client.set(keys.counters, "junk")
    ok = q.submit(train())
    client.zadd(keys.queue("normal", 0, 1), {"ghost": 0})  # junk that claim dead-letters
    job = q.claim("w", CPU)
    assert job is not None and job.id == ok.id
    reasons = {(d["source"], d["reason"].split(";")[0]) for d in q.dead_letters(10)}
    assert reasons == {(keys.dead_letters, "a string where a list belongs"),
                       (keys.counters, "a string where a hash belongs"),
                       (keys.queue("normal", 0, 1), "job hash is missing")}
    # counters were moved aside at submit, which then counted into a fresh hash
    assert q.counters()["dead_lettered"] == 3 and q.counters()["submitted"] == {("train", "capsnet"): 1}


def test_counters_that_are_not_integers_restart(q, client, keys):
    client.hset(keys.counters, mapping={"submitted:train:capsnet": "x", "lease_expiries": "1.5"})
    rec = q.submit(train())
    client.hset(keys.job(rec.id), "lease_expiries", "many")
    q.claim("w", CPU)
    assert q.requeue_expired(now=time.time() + 6) == [rec.id]  # raised "not an integer" after half the writes
    assert q.get(rec.id).state == "queued" and q.get(rec.id).lease_expiries == 1
    assert q.counters()["submitted"] == {("train", "capsnet"): 1} and q.counters()["lease_expiries"] == 1


def test_sequence_counter_that_is_not_an_integer_is_moved_aside(q, client, keys):
    client.set(keys.seq, "abc")
    rec = q.submit(train())  # raised after creating a half-written job hash, before the fix
    assert q.get(rec.id).state == "queued" and q.get(rec.id).seq == 1
    assert client.get(quarantined(client, keys, keys.seq)[0]) == "abc"
    assert q.claim("w", CPU).id == rec.id


# ---------------------------------------------------------------- every script, every key


@dataclass
class Scenario:
    """``setup`` brings the queue to the state the operation needs and returns the job id (or
    None); ``op`` runs one queue operation (one script) and returns what it answered."""

    setup: Callable[[JobQueue], Any]
    op: Callable[[JobQueue, Any], Any]


def _claimed(q: JobQueue, **kw: Any):
    q.submit(train(**kw))
    return q.claim("w1", CPU)


def _failed(q: JobQueue):
    job = _claimed(q)
    q.fail(job.id, job.token, "boom", retry=False)
    return job


def _retrying(q: JobQueue):
    job = _claimed(q, max_retries=2)
    q.fail(job.id, job.token, "boom")
    return job


def _cancel_requested(q: JobQueue):
    job = _claimed(q)
    q.cancel(job.id)
    return job


def _bad_json(q: JobQueue):
    rec = q.submit(train())
    q.client.hset(q.keys.job(rec.id), "spec", "{not json")
    return rec


def _id(x: Any) -> str:
    return x.id


SCENARIOS: dict[str, Scenario] = {
    "submit": Scenario(lambda q: None, lambda q, _: q.submit(train(), idempotency_key="k1").state),
    "submit-again": Scenario(lambda q: q.submit(train(), idempotency_key="k1"),
                             lambda q, rec: q.submit(train(), idempotency_key="k1").id == rec.id),
    "claim": Scenario(lambda q: q.submit(train()), lambda q, rec: getattr(q.claim("w2", CPU), "id", None) == rec.id),
    "claim-rejects": Scenario(_bad_json, lambda q, rec: q.claim("w2", CPU)),
    "heartbeat": Scenario(_claimed, lambda q, job: q.renew(job.id, job.token)),
    "progress": Scenario(_claimed, lambda q, job: q.report_progress(job.id, job.token, {"epoch": 1})),
    "checkpoint": Scenario(_claimed, lambda q, job: q.set_checkpoint(job.id, job.token, "file:///c.pt")),
    "complete": Scenario(_claimed, lambda q, job: q.complete(job.id, job.token, {"ok": 1})),
    "complete-after-cancel": Scenario(_cancel_requested, lambda q, job: q.complete(job.id, job.token, {"ok": 1})),
    "fail-retry": Scenario(lambda q: _claimed(q, max_retries=1), lambda q, job: q.fail(job.id, job.token, "x")),
    "fail-final": Scenario(_claimed, lambda q, job: q.fail(job.id, job.token, "x", retry=False)),
    "fail-cancelled": Scenario(_cancel_requested, lambda q, job: q.fail(job.id, job.token, "x")),
    "cancel-queued": Scenario(lambda q: q.submit(train()), lambda q, rec: q.cancel(rec.id)),
    "cancel-running": Scenario(_claimed, lambda q, job: q.cancel(job.id)),
    "cancel-retrying": Scenario(_retrying, lambda q, job: q.cancel(job.id)),
    "mark-cancelled": Scenario(_cancel_requested, lambda q, job: q.mark_cancelled(job.id, job.token)),
    "retry": Scenario(_failed, lambda q, job: q.retry(job.id).state),
    "dead-letter-claimed": Scenario(_claimed, lambda q, job: q._run("dead_letter_claimed", [job.id, job.token, "bad"])),
    "requeue-expired": Scenario(lambda q: _claimed(q, max_retries=1),
                                lambda q, job: q.requeue_expired(now=time.time() + 6) == [job.id]),
    "requeue-expired-final": Scenario(_claimed, lambda q, job: q.requeue_expired(now=time.time() + 6) == [job.id]),
    "requeue-expired-cancelled": Scenario(_cancel_requested,
                                          lambda q, job: q.requeue_expired(now=time.time() + 6) == [job.id]),
    "promote-due": Scenario(_retrying, lambda q, job: q.promote_due(now=time.time() + 60) == [job.id]),
    "hand-back": Scenario(_claimed, lambda q, job: q.hand_back(job.id, job.token, "node died")),
    "hand-back-final": Scenario(lambda q: _claimed(q, max_lost=0),
                                lambda q, job: q.hand_back(job.id, job.token, "node died")),
    "hand-back-cancelled": Scenario(_cancel_requested, lambda q, job: q.hand_back(job.id, job.token, "node died")),
    "prune": Scenario(_failed, lambda q, job: q.prune(0, limit=10).job_ids == [job.id]),
}

# Fields that differ between two runs of the same scenario whatever happens.
_VOLATILE = {"id", "lease_token", "ended_token", "lease_expires_at", "not_before", "created_at", "updated_at", "queued_at",
             "started_at", "retrying_at", "finished_at", "heartbeat_at", "checkpoint_at", "cancel_requested_at"}


def _job_ids(q: JobQueue) -> list[str]:
    return [m for m in q.client.zrange(q.keys.jobs, 0, -1)] if q.client.type(q.keys.jobs) == "zset" else []


def _placeholders(key: str, job_ids: list[str]) -> str:
    for n, job_id in enumerate(job_ids):
        key = key.replace(job_id, f"<job{n}>")
    return key


def _snapshot(q: JobQueue, job_ids: list[str], planted: str) -> dict[str, Any]:
    """Everything that must not depend on a junk key having been moved aside: each job's record
    (without timestamps and tokens), its events, and the key names (job ids replaced by
    placeholders; quarantine, dead letters, counters and the ``planted`` one left out)."""
    jobs = []
    for job_id in job_ids:
        h = q.client.hgetall(q.keys.job(job_id))
        record = {k: v for k, v in h.items() if k not in _VOLATILE and k != "transitions"}
        record["transitions"] = [{k: v for k, v in t.items() if k not in ("at", "not_before", "delay")}
                                 for t in json.loads(h.get("transitions", "[]"))]
        record["events"] = None  # junk where the stream belongs, left alone by the operation
        if q.client.type(q.keys.events(job_id)) in ("stream", "none"):
            record["events"] = [(e["type"], e["data"].get("state"), e["data"].get("message"))
                                for _, e in q.events.read(job_id)]
        jobs.append(record)
    skip = (q.keys.quarantine("", "")[:-2], q.keys.dead_letters, q.keys.counters)
    names = {_placeholders(key, job_ids) for key in q.client.scan_iter(match=q.keys.all_pattern())
             if not key.startswith(skip[0]) and key not in skip[1:]}
    names.discard(planted)
    return {"jobs": jobs, "keys": sorted(names)}


def _candidate_keys(q: JobQueue, job_ids: list[str]) -> set[str]:
    """Every key the scenario's operation could read or write."""
    k = q.keys
    out = {k.leases, k.delayed, k.dead_letters, k.counters, k.notify, k.seq, k.jobs, k.shapes("normal"),
           k.queue("normal", 0, 1), k.idempotency("k1")}
    out |= {k.state(s, "normal") for s in JobState}
    out |= {k.events(j) for j in job_ids}
    out |= set(q.client.scan_iter(match=k.all_pattern()))
    return {key for key in out if not any(key == k.job(j) for j in job_ids)}


def _plant(q: JobQueue, key: str) -> Any:
    """Overwrite ``key`` with junk of a wrong type; returns the junk as Redis will give it back."""
    q.client.delete(key)
    if key == q.keys.seq or key.startswith(q.keys.idempotency("")[: -32]):
        q.client.hset(key, "junk", "1")
        return {"junk": "1"}
    q.client.set(key, "junk")
    return "junk"


def _read_back(q: JobQueue, key: str) -> Any:
    kind = q.client.type(key)
    return q.client.hgetall(key) if kind == "hash" else q.client.get(key) if kind == "string" else kind


# Planting junk here destroys what the operation needs to find the job, so the outcome may
# differ from the clean run (it must still not raise, and the junk must be accounted for).
_FINDS_THE_JOB = {("claim", "queue"), ("claim", "shapes"), ("claim-rejects", "queue"),
                  ("claim-rejects", "shapes"), ("submit-again", "idem"), ("prune", "state")}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_no_script_half_applies_with_any_key_of_the_wrong_type(q, client, name):
    scenario = SCENARIOS[name]
    client.flushdb()
    ctx = scenario.setup(q)
    clean_before = _job_ids(q)
    setup_events = [q.events.length(j) for j in clean_before]
    candidates = {_placeholders(k, clean_before) for k in _candidate_keys(q, clean_before)}
    clean_answer = scenario.op(q, ctx)
    clean_ids = clean_before + [j for j in _job_ids(q) if j not in clean_before]
    clean = _snapshot(q, clean_ids, "")
    candidates |= {_placeholders(k, clean_ids) for k in _candidate_keys(q, clean_ids)}
    assert len(candidates) >= 15
    for template in sorted(candidates):
        client.flushdb()
        ctx = scenario.setup(q)
        ids_before = _job_ids(q)
        key = template
        for n, job_id in enumerate(ids_before):
            key = key.replace(f"<job{n}>", job_id)
        if "<job" in key:  # a key of a job the operation creates: its id is not known yet
            continue
        junk = _plant(q, key)
        answer = scenario.op(q, ctx)  # must not raise
        where = f"{name}: junk at {template}"
        moved = quarantined(client, q.keys, key)
        if moved:
            assert [_read_back(q, m) for m in moved] == [junk], where
            assert any(d.get("source") == key and "; moved to " in d.get("reason", "")
                       for d in q.dead_letters(20)), where
        elif name == "prune" and key == q.keys.events(ctx.id):
            assert client.exists(key) == 0, where  # the pruned job's own key goes with it, junk or not
        else:  # not touched by this operation: still where it was, as it was
            assert _read_back(q, key) == junk, where
        kind = next((part for part in ("queue", "shapes", "idem", "state") if f":{part}:" in key), "")
        if (name, kind) in _FINDS_THE_JOB:
            continue
        assert answer == clean_answer, where
        ids = ids_before + [j for j in _job_ids(q) if j not in ids_before]
        expected = {**clean, "keys": [k for k in clean["keys"] if k != template],
                    "jobs": [dict(job) for job in clean["jobs"]]}
        for n, _ in enumerate(ids_before):
            if template == _placeholders(q.keys.events(ids_before[n]), ids_before):
                # the setup's events went with the junk: only the operation's own ones are left
                events = expected["jobs"][n]["events"]
                expected["jobs"][n]["events"] = events[setup_events[n]:] if moved or name == "prune" else None
        assert _snapshot(q, ids, template) == expected, where

