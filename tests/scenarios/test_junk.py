"""No content of Redis makes capsctl print a traceback.

First the cases found by hand, each against a real redis-server (conftest's ``redis_url``) and
the CLI through click's CliRunner; then a property-based fuzz (hypothesis) that writes random
garbage into every key pattern of ``services.queue.keys.TEMPLATES`` and runs every read command and a
claim loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cli import main
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import TEMPLATES, Keys
from services.queue.states import JobState
from services.spec.types import PRIORITIES

PREFIX = "capsnet:"
KEYS = Keys(PREFIX)
CPU = {"gpus": 0, "cpus": 64}


def lenet(**extra: object) -> dict[str, object]:
    return {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 64, "test_subset": 64, **extra}


def invoke(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_clean(result: Result, args: Sequence[str], codes: Iterable[int] = (0,)) -> None:
    """No traceback, an expected exit code, one ``Error:`` line on failure, valid JSON for --json."""
    shown = f"capsctl {' '.join(args)} -> {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        shown + "\n" + "".join(__import__("traceback").format_exception(result.exception)))
    assert "Traceback" not in result.output, shown
    assert result.exit_code in tuple(codes), shown
    if result.exit_code != 0:
        assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1, shown
    elif "--json" in args:
        lines = result.output.splitlines() if args[0] == "logs" else [result.output]
        for text in lines:
            json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output\n{shown}"))


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"CAPSNET_REDIS_URL": redis_url, "CAPSNET_STATE_DIR": str(tmp_path / "state"),
            "CAPSNET_REDIS_PREFIX": PREFIX, "CAPSNET_ARTIFACTS": str(tmp_path / "artifacts")}


@pytest.fixture
def raw(redis_url: str) -> Iterable[redis.Redis]:
    """A client that does not decode: writes any bytes, as a stray program would."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue(redis_url: str) -> Iterable[JobQueue]:
    q = JobQueue(redis_client(redis_url), KEYS, lease_seconds=30)
    yield q
    q.client.close()


def run_ok(env: dict[str, str], *args: str) -> str:
    result = invoke(env, *args)
    assert_clean(result, args)
    return result.output


# ----------------------------------------------------------------------------- the cases found by hand


def test_non_utf8_job_id_dead_lettered_into_the_failed_index(env, raw, queue) -> None:
    bad = b"j-\xff\xc0bad"
    raw.hset(b"capsnet:job:" + bad, mapping={b"state": b"queued", b"priority": b"normal", b"gpus": b"0",
                                             b"cpus": b"1", b"seq": b"0", b"spec": b"not json"})
    raw.zadd(b"capsnet:queue:normal:0:1", {bad: 0})
    raw.sadd(b"capsnet:shapes:normal", b"0:1")
    raw.zadd(b"capsnet:jobs", {bad: 0, b"j-\xfe-no-record": 1})
    assert queue.claim("w", CPU) is None  # dead-lettered into state:failed:normal by the queue itself
    assert raw.zrange(b"capsnet:state:failed:normal", 0, -1) == [bad]
    for args in (("list", "--state", "failed"), ("list",)):
        out = run_ok(env, *args)
        assert "j-\\xff\\xc0bad" in out and "failed" in out
    listed = json.loads(run_ok(env, "list", "--state", "failed", "--json"))
    assert [j["id"] for j in listed] == ["j-\\xff\\xc0bad"]
    assert "spec is not valid JSON" in run_ok(env, "dead-letters")


def test_status_with_unreadable_transitions(env, queue, raw) -> None:
    job = queue.submit(lenet())
    raw.hset(KEYS.job(job.id), "transitions", '[1,"x",null]')
    out = run_ok(env, "status", job.id)
    assert out.count("<unreadable>") == 3
    assert json.loads(run_ok(env, "status", job.id, "--json"))["transitions"] == [
        {"invalid": 1}, {"invalid": "x"}, {"invalid": None}]
    raw.hset(KEYS.job(job.id), mapping={"transitions": "[{\"at\": \"abc\", \"state\": [1]}", "attempt": "1e400",
                                        "created_at": "nan", "progress": '{"step": 1e999, "epoch": 1, "epochs": 2}'})
    assert "<unreadable>" in run_ok(env, "status", job.id)
    run_ok(env, "list")


def test_dead_letters_with_junk_times_and_bytes(env, raw) -> None:
    raw.lpush(KEYS.dead_letters, json.dumps({"job_id": "j-1", "reason": "r", "at": "abc", "source": "s"}),
              b'{"job_id": "j-\xff", "reason": "\xfe", "at": 1e999}', b"\xff\xfe not json", b"[1,2]")
    out = run_ok(env, "dead-letters")
    assert "invalid" in out and "j-\\xff" in out and "\\xff\\xfe not json" in out
    entries = json.loads(run_ok(env, "dead-letters", "--json"))
    assert entries[-1]["at"] == "abc" and entries[-1]["job_id"] == "j-1" and entries[-3]["raw"] == "\\xff\\xfe not json"


def test_logs_with_junk_event_data(env, queue, raw) -> None:
    job = queue.submit(lenet())
    key = KEYS.events(job.id)
    raw.xadd(key, {"type": "log", "at": "1", "data": "[1,2]"})
    raw.xadd(key, {"type": b"\xff", "at": b"\xfe", "data": b"\xff\xfe{"})
    raw.xadd(key, {"type": "state", "at": "nan", "data": '{"from": "queued"}'})
    raw.xadd(key, {"type": "progress", "at": "1e300", "data": '{"type": "epoch", "loss": 1e999, "epoch": [1]}'})
    raw.xadd(key, {b"\xff": b"\xff"})
    out = run_ok(env, "logs", job.id)
    assert "[1,2]" in out and "\\xff\\xfe{" in out and "queued -> ?" in out
    run_ok(env, "logs", job.id, "--json")
    raw.delete(key)
    raw.hset(key, "not", "a stream")
    run_ok(env, "logs", job.id)


def test_junk_worker_registrations(env, queue, raw) -> None:
    far = queue._server_time() + 600
    for worker_id, info in (("w-x", {"available": {"gpus": "x"}}),
                            ("w-nan", {"resources": {"gpus": "nan", "cpus": 4}, "available": {"gpus": "nan"}}),
                            ("w-neg", {"resources": {"gpus": -1, "cpus": 4}, "seen_at": "abc"})):
        raw.set(KEYS.worker(worker_id), json.dumps(info))
        raw.zadd(KEYS.workers, {worker_id: far})
    raw.set(KEYS.worker("w-\xff"), b"\xff not json")
    raw.zadd(KEYS.workers, {"w-\xff": far})
    out = run_ok(env, "workers")
    assert out.count("invalid") >= 5  # NaN and negative resources, free "x", the unreadable one
    run_ok(env, "status")
    status = json.loads(run_ok(env, "status", "--json"))
    # w-x offers nothing (0 GPUs, 0 CPUs), the NaN and negative ones are ignored.
    assert status["cluster"] == {"workers": 1, "gpus": 0, "cpus": 0, "max_gpus": 0, "max_cpus": 0}
    run_ok(env, "workers", "--json")


def test_nan_gpus_worker_does_not_block_submit(env, queue, raw) -> None:
    queue.register_worker("w-ok", {"resources": {"gpus": 0, "cpus": 4}})
    queue.register_worker("w-nan", {"resources": {"gpus": "nan", "cpus": "inf"}})
    job_id = run_ok(env, "submit", "lenet5", "--epochs", "1").strip()
    assert queue.get(job_id).state == "queued"
    assert queue.cluster_capacity()["workers"] == 1
    too_big = invoke(env, "submit", "lenet5", "--gpus", "2")
    assert_clean(too_big, ("submit",), codes=(2,))
    assert "largest: 0 GPUs" in too_big.output and "nan" not in too_big.output


@pytest.mark.parametrize("args", [
    ("submit", "lenet5", "--name", "\udcff"),
    ("submit", "lenet5", "--idempotency-key", "ok\udcfe"),
    ("eval", "j-\udcff", "--name", "x"),
    ("status", "j-\udcff"),
    ("--redis-prefix", "p\udcff:", "list"),
])
def test_arguments_that_are_not_utf8_are_a_usage_error(env, queue, args) -> None:
    result = invoke(env, *args)  # Python hands over undecodable argv bytes as surrogates
    assert_clean(result, args, codes=(2,))
    assert "not valid UTF-8 text: " in result.output
    assert "\\xff" in result.output or "\\xfe" in result.output
    assert queue.list() == []


# ----------------------------------------------------------------------------- the fuzz

# The Redis type each key pattern holds (services/queue/keys.py); a new template must be added here.
EXPECTED_TYPE = {"job": "hash", "events": "stream", "queue": "zset", "shapes": "set", "delayed": "zset",
                 "leases": "zset", "state": "zset", "jobs": "zset", "idem": "string", "dead": "list",
                 "quarantine": "string", "workers": "zset", "worker": "string", "counters": "hash",
                 "notify": "list", "seq": "string"}
# Keys and counter fields that the claim fuzz keeps to the type the scripts expect. Empty: every
# script checks key types before its first write and increments fields without raising, so the
# claim fuzz puts anything anywhere, like the read fuzz. (Add to these only with a reason.)
LUA_UNCHECKED: set[str] = set()
LUA_INCREMENTED: tuple[bytes, ...] = ()

TYPES = ("string", "hash", "zset", "set", "list", "stream")
IDS = [b"J1", b"j-junk", b"\xff\xc0", b"w-junk"]
TEXT_IDS = ["J1", "j-junk"]
FIELDS = [b"id", b"kind", b"state", b"priority", b"spec", b"attempt", b"max_retries", b"retry_base", b"model",
          b"name", b"gpus", b"cpus", b"created_at", b"updated_at", b"started_at", b"finished_at", b"transitions",
          b"worker", b"lease_token", b"lease_expires_at", b"error", b"result", b"progress", b"checkpoint",
          b"cancel_requested", b"seq", b"type", b"at", b"data", b"resources", b"available", b"seen_at"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.sampled_from(["\ud800", "nan"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from([f.decode() for f in FIELDS]) | st.text(max_size=4), children, max_size=4),
    max_leaves=12)
junk = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"", b"nan", b"inf", b"-inf", b"-1", b"1e400", b"9" * 5000, b"\xff\xfe", b'[1,"x",null]',
                     b"[1,2]", b"{}", b"null", b'{"gpus":"nan","cpus":-1}', b"[" * 3000, b'{"at":"abc"}',
                     b'{"available":{"gpus":"x"}}', b'{"resources":{"gpus":1e999}}', b"\xff" + b"[1]" * 10]),
    json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
)
key_args = st.sampled_from(IDS + [p.encode() for p in list(PRIORITIES) + list(JobState)] + [b"0", b"1", b"0:1"]) | st.binary(max_size=4)
scores = st.floats(allow_nan=False) | st.sampled_from([0.0, 1e18])


@st.composite
def writes(draw: st.DrawFn) -> tuple[str, bytes, str, object]:
    """(template name, key, Redis type, value) of one junk write."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    args = [draw(key_args) for _ in range(TEMPLATES[name].count("{}"))]
    parts = TEMPLATES[name].encode().split(b"{}")
    key = PREFIX.encode() + parts[0] + b"".join(a + p for a, p in zip(args, parts[1:], strict=True))
    kind = draw(st.sampled_from(TYPES))
    if kind == "string":
        value: object = draw(junk)
    elif kind == "hash":
        value = draw(st.dictionaries(st.sampled_from(FIELDS) | st.binary(max_size=4), junk, min_size=1, max_size=5))
    elif kind == "zset":
        value = draw(st.dictionaries(st.sampled_from(IDS) | junk, scores, min_size=1, max_size=4))
    elif kind in ("set", "list"):
        value = draw(st.lists(junk, min_size=1, max_size=4))
    else:
        value = draw(st.lists(st.dictionaries(st.sampled_from([b"type", b"at", b"data"]) | st.binary(max_size=3),
                                              junk, min_size=1, max_size=3), min_size=1, max_size=3))
    return name, key, kind, value


@st.composite
def queued_junk_jobs(draw: st.DrawFn) -> tuple[bytes, str, dict[bytes, bytes]]:
    """A job hash that looks queued (so claim reaches it) with junk in some fields."""
    job_id = draw(st.sampled_from(IDS))
    priority = draw(st.sampled_from(PRIORITIES))
    fields = {b"id": job_id, b"state": b"queued", b"priority": priority.encode(), b"gpus": b"0", b"cpus": b"1",
              b"seq": b"0", b"kind": b"train", b"model": b"lenet5",
              b"spec": draw(st.sampled_from([json.dumps(lenet()).encode(), b"{}", b'{"kind": "train"}']) | junk)}
    fields.update(draw(st.dictionaries(st.sampled_from(FIELDS), junk, max_size=4)))
    return job_id, priority, fields


def write(client: redis.Redis, kind: str, key: bytes, value: object) -> None:
    if kind == "string":
        client.set(key, value)  # type: ignore[arg-type]
    elif kind == "hash":
        client.hset(key, mapping=value)  # type: ignore[arg-type]
    elif kind == "zset":
        client.zadd(key, value)  # type: ignore[arg-type]
    elif kind == "set":
        client.sadd(key, *value)  # type: ignore[misc]
    elif kind == "list":
        client.rpush(key, *value)  # type: ignore[misc]
    else:
        for entry in value:  # type: ignore[attr-defined]
            client.xadd(key, entry)


def put_queued_job(client: redis.Redis, job: tuple[bytes, str, dict[bytes, bytes]]) -> None:
    job_id, priority, fields = job
    client.delete(PREFIX.encode() + b"job:" + job_id)
    client.hset(PREFIX.encode() + b"job:" + job_id, mapping=fields)
    client.zadd(KEYS.queue(priority, 0, 1), {job_id: 0})
    client.sadd(KEYS.shapes(priority), "0:1")
    client.zadd(KEYS.jobs, {job_id: 0})
    client.zadd(KEYS.state("queued", priority), {job_id: 0})


GLOBAL_COMMANDS = [("list",), ("status",), ("dead-letters",), ("workers",)]


def run_read_commands(env: dict[str, str], client: redis.Redis, job_ids: Iterable[str], state: str) -> None:
    """Every read command, plain and --json (``list --state`` for one state per example, to
    keep the run short: hypothesis draws a different one each time)."""
    for args in (*GLOBAL_COMMANDS, ("list", "--state", state)):
        for full in (args, (*args, "--json")):
            assert_clean(invoke(env, *full), full)
    for job_id in job_ids:
        is_job = client.type(KEYS.job(job_id)) == b"hash"
        for command in ("status", "logs", "results"):
            for full in ((command, job_id), (command, job_id, "--json")):
                # 1 = one-line "no job" (its key is not a job hash) or "no results yet"
                codes = (0, 1) if command == "results" or not is_job else (0,)
                assert_clean(invoke(env, *full), full, codes)


# Derandomized: the same 15 examples every run, so CI never fails on a draw no one can replay;
# explore more locally with HYPOTHESIS_SEED / a higher max_examples.
FUZZ = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(junk_writes=st.lists(writes(), min_size=1, max_size=12), jobs=st.lists(queued_junk_jobs(), max_size=3),
       state=st.sampled_from([s.value for s in JobState]))
def test_fuzz_read_commands_survive_any_junk(redis_url, env, junk_writes, jobs, state) -> None:
    """Anything anywhere (wrong types, overwritten records and indexes): every read command
    exits 0 (1 with one line for a job id that names no job, or a job without results)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    queue = JobQueue(redis_client(redis_url), KEYS)
    valid = [queue.submit(lenet()).id for _ in range(2)]
    queue.register_worker("w-real", {"resources": {"gpus": 0, "cpus": 4}, "available": {"gpus": 0, "cpus": 4}})
    for job in jobs:
        put_queued_job(client, job)
    for _name, key, kind, value in junk_writes:
        client.delete(key)
        write(client, kind, key, value)
    run_read_commands(env, client, [*TEXT_IDS, valid[0]], state)
    queue.client.close()
    client.close()


@FUZZ
@given(junk_writes=st.lists(writes(), min_size=1, max_size=12), jobs=st.lists(queued_junk_jobs(), max_size=3),
       state=st.sampled_from([s.value for s in JobState]))
def test_fuzz_claim_loop_survives_junk_and_claims_every_valid_job(redis_url, env, junk_writes, jobs,
                                                                   state) -> None:
    """Junk next to valid jobs (never over them): claims never raise, junk is claimed or set
    aside, every valid job is claimed exactly once, and read commands stay clean after."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    queue = JobQueue(redis_client(redis_url), KEYS, lease_seconds=30)
    valid = {queue.submit(lenet(priority=p)).id for p in PRIORITIES}
    valid_keys = set(client.keys(KEYS.all_pattern()))
    for job in jobs:
        put_queued_job(client, job)
    for name, key, kind, value in junk_writes:
        existing = client.type(key).decode()
        if existing != "none":
            kind = existing  # add to what is there, never replace it (valid jobs live there)
        elif name in LUA_UNCHECKED:
            kind = EXPECTED_TYPE[name]
        if key in valid_keys and kind == "hash" and name == "job":
            continue  # a valid job's own record: junk there would make it junk
        if kind == "hash" and name in ("counters", "job"):
            value = {f: (b"7" if f in LUA_INCREMENTED else v) for f, v in _as_hash(value).items()}
        write(client, kind, key, _coerce(kind, value))
    claimed: list[str] = []
    for _ in range(100):
        job = queue.claim("w-fuzz", CPU)
        if job is None:
            break
        claimed.append(job.id)
        assert queue.complete(job.id, job.token, {"ok": True})
    assert valid <= set(claimed), f"valid jobs not claimed: {valid - set(claimed)}"
    assert len(claimed) == len(set(claimed))
    assert all(queue.get(j).state == "succeeded" for j in valid)
    run_read_commands(env, client, [*TEXT_IDS, min(valid)], state)
    queue.client.close()
    client.close()


def _as_hash(value: object) -> dict[bytes, bytes]:
    if isinstance(value, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v if isinstance(v, bytes) else repr(v).encode()
                for k, v in value.items()}
    return {b"junk": value if isinstance(value, bytes) else repr(value).encode()}


def _coerce(kind: str, value: object) -> object:
    """A drawn value reshaped to fit a Redis type chosen after the draw."""
    if kind == "hash":
        return _as_hash(value)
    items = list(value) if isinstance(value, dict | list) else [value]
    members = [i if isinstance(i, bytes) else repr(i).encode() for i in items]
    if kind == "string":
        return members[0]
    if kind == "zset":
        scores_of = value if isinstance(value, dict) else {}
        return {m: (s if isinstance(s := scores_of.get(m, 0.0), float) and not math.isnan(s) else 0.0)
                for m in members}
    if kind in ("set", "list"):
        return members
    return [{b"data": m} for m in members]  # stream


# ----------------------------------------------------------------------------- junk ahead of a priority

def test_priority_holds_however_much_junk_precedes_it(queue, raw) -> None:
    """1,500 junk entries (six claim pages) ahead of a valid high job: the first claim
    still returns the high job, not the valid normal one, and every junk entry it passed is gone
    to the dead-letter list."""
    normal = queue.submit(lenet(priority="normal"), check_capacity=False)
    high = queue.submit(lenet(priority="high"), check_capacity=False)
    record = queue.get(high.id)
    high_queue = KEYS.queue("high", record.gpus, record.cpus)
    assert raw.zscore(high_queue, high.id) is not None
    for i in range(1500):  # three kinds of junk, all scored ahead of the job
        junk_id = f"junk-{i}"
        if i % 3 == 1:
            raw.set(KEYS.job(junk_id), "not a hash")
        elif i % 3 == 2:
            raw.hset(KEYS.job(junk_id), mapping={"state": "queued", "priority": "high", "gpus": "0",
                                                 "cpus": "1", "seq": "0", "spec": "not json"})
        raw.zadd(high_queue, {junk_id: -1500 + i})
    claimed = queue.claim("w", CPU)
    assert claimed is not None and claimed.job_id == high.id
    assert raw.zcard(high_queue) == 0
    assert int(raw.hget(KEYS.counters, "dead_lettered")) == 1500
    assert queue.claim("w", CPU).job_id == normal.id
