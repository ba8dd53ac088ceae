"""Redis out of memory (``maxmemory`` reached under ``noeviction``) and an evicting Redis, against
real redis-servers: OOM replies are transient and their own episode, a job that meets a full
Redis mid-run still ends ``succeeded`` exactly once with its worker alive, and an evicting
``maxmemory-policy`` is a loud warning in the log, ``capsctl status``/``workers`` and the
metrics (``CAPSNET_REQUIRE_NOEVICTION=1``: the worker refuses to start)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from services.cli import main
from services.metrics.redis_state import RedisHealthCollector
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.redis_health import EvictionPolicyRefused, PolicyWatch, check_policy, read_health
from services.queue.redis_retry import RedisRetry, is_out_of_memory, is_transient

from ..service_helpers import WorkerProcess, service_env, wait_until
from .test_redis_outage import TINY_LENET, RedisServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def _fill_until_oom(client: redis.Redis) -> int:
    """maxmemory just above used_memory, then junk keys until Redis refuses a write; then
    maxmemory at half of what is used, so that freed buffers (AOF, client output) never let a
    write slip through: Redis stays full until the test raises maxmemory."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 256 * 1024)
    for i in range(100_000):
        try:
            client.set(f"junk:{i}", "x" * 4096)
        except redis.exceptions.OutOfMemoryError:
            client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
            return i
    raise AssertionError("Redis never refused a write")


def _env(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key in ("RAY_ADDRESS", "CAPSNET_REDIS_PREFIX", "CAPSNET_REQUIRE_NOEVICTION"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CAPSNET_REDIS_URL", url)
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))


# ----------------------------------------------------------------------------- OOM is transient


def test_oom_is_transient_and_its_own_episode(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis(port=server.port)
    _fill_until_oom(client)
    script = client.register_script("redis.call('TYPE', KEYS[1]); return redis.call('SET', KEYS[1], 'v')")
    errors = []
    for write in (lambda: client.set("k", "v"), lambda: script(keys=["k"]), lambda: client.xadd("s", {"a": 1})):
        with pytest.raises(redis.RedisError) as info:
            write()
        errors.append(info.value)
    assert all(is_transient(e) and is_out_of_memory(e) for e in errors), errors
    assert client.get("k") is None  # the script was refused before its first write

    retry = RedisRetry(logging.getLogger("test.oom"), base=0.05, cap=0.2)
    calls = []

    def publish() -> object:
        calls.append(1)
        return client.set("k", "v")

    with caplog.at_level(logging.WARNING, logger="test.oom"):
        assert retry.attempt(publish, what="publishing", default="dropped") == "dropped"
        # A read answers while Redis is full: that does not end the episode...
        assert retry.attempt(client.get, "junk:0", what="reading") is not None
        assert retry.out_of_memory and not retry.down
        # ... and attempt() keeps trying (an OOM reply is immediate), never skipping.
        assert retry.attempt(publish, what="publishing", default="dropped") == "dropped"
        assert len(calls) == 2
        # call() waits with back-off until memory is raised.
        threading.Timer(0.6, lambda: redis.Redis(port=server.port).config_set("maxmemory", 0)).start()
        started = time.monotonic()
        assert retry.call(publish, what="publishing") is True
        assert time.monotonic() - started >= 0.5 and not retry.out_of_memory
    lines = [r.getMessage() for r in caplog.records]
    assert sum("out of memory" in line and "raise maxmemory" in line for line in lines) == 1, lines
    assert sum("accepts writes again" in line for line in lines) == 1, lines
    assert not any("Redis unavailable" in line or "answers again" in line for line in lines), lines


# ----------------------------------------------------------------------------- eviction policy


def test_noeviction_gives_no_warning(server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    _env(server.url, tmp_path, monkeypatch)
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory", 100 * 2**20)
    health = check_policy(client, logging.getLogger("test.policy"), require_noeviction=True)
    assert health.policy == "noeviction" and health.source == "config" and health.policy_ok
    assert health.maxmemory == 100 * 2**20 and 0 < health.memory_ratio < 0.9
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    status = CliRunner().invoke(main, ["status"], catch_exceptions=False)
    assert status.exit_code == 0, status.output
    assert "maxmemory-policy noeviction" in status.output and "of 100.0 MiB maxmemory" in status.output
    assert "WARNING" not in status.output
    assert "WARNING" not in CliRunner().invoke(main, ["workers"], catch_exceptions=False).output
    registry = CollectorRegistry()
    registry.register(RedisHealthCollector(client))
    assert registry.get_sample_value("capsnet_redis_eviction_policy_ok") == 1
    assert registry.get_sample_value("capsnet_redis_maxmemory_bytes") == 100 * 2**20
    assert registry.get_sample_value("capsnet_redis_memory_used_bytes") > 0


def test_evicting_policy_is_a_loud_warning_everywhere(server: RedisServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _env(server.url, tmp_path, monkeypatch)
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING):
        health = check_policy(client, logging.getLogger("test.policy"))
    assert health.policy_ok is False
    assert any("allkeys-lru, not noeviction" in r.getMessage() for r in caplog.records)
    for command in (["status"], ["workers"]):
        result = CliRunner().invoke(main, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "WARNING  Redis maxmemory-policy is allkeys-lru, not noeviction" in result.output, result.output
    info = CliRunner().invoke(main, ["status", "--json"], catch_exceptions=False)
    assert '"eviction_policy_ok": false' in info.output and '"maxmemory_policy": "allkeys-lru"' in info.output
    registry = CollectorRegistry()
    registry.register(RedisHealthCollector(client))
    assert registry.get_sample_value("capsnet_redis_eviction_policy_ok") == 0
    # The memory warning, above 90 % of maxmemory.
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(int(client.info("memory")["used_memory"]) / 0.95))
    result = CliRunner().invoke(main, ["status"], catch_exceptions=False)
    assert "WARNING  Redis memory is at" in result.output and "of maxmemory" in result.output, result.output


def test_policy_watch_warns_when_the_policy_changes_later(server: RedisServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis(port=server.port)
    watch = PolicyWatch(client, logging.getLogger("test.watch"), interval=0.2)
    with caplog.at_level(logging.WARNING, logger="test.watch"):
        watch.maybe_check()
        time.sleep(0.25)
        watch.maybe_check()
        assert not caplog.records and watch.health.policy_ok
        client.config_set("maxmemory-policy", "volatile-lru")
        watch.maybe_check()  # not due yet
        assert not caplog.records
        time.sleep(0.25)
        watch.maybe_check()
    assert watch.health.policy == "volatile-lru"
    assert [r.getMessage() for r in caplog.records if "volatile-lru, not noeviction" in r.getMessage()]


def test_require_noeviction_refuses_to_start_the_worker(server: RedisServer, tmp_path: Path) -> None:
    redis.Redis(port=server.port).config_set("maxmemory-policy", "volatile-lru")
    env = {**service_env(server.url, "", tmp_path / "artifacts"), "CAPSNET_REQUIRE_NOEVICTION": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "worker"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "volatile-lru" in errors[0] and "CAPSNET_REQUIRE_NOEVICTION=1" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60  # refused before Ray starts


def test_config_disabled_falls_back_to_info_then_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    managed = RedisServer(tmp_path / "managed", None, "--rename-command", "CONFIG", "",
                          "--maxmemory-policy", "allkeys-lru").start()
    try:
        client = redis.Redis(port=managed.port)
        with pytest.raises(redis.ResponseError):
            client.config_get("maxmemory-policy")
        health = read_health(client)
        assert health.policy == "allkeys-lru" and health.source == "info" and health.policy_ok is False
        # A user allowed neither CONFIG nor INFO: "unknown", never a crash.
        client.acl_setuser("limited", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                           commands=["+@all", "-config", "-info"])
        url = f"redis://limited:pw@127.0.0.1:{managed.port}/0"
        health = read_health(redis_client(url))
        assert health.policy is None and health.policy_ok is None and health.source == "unknown"
        with pytest.raises(EvictionPolicyRefused, match="cannot be read"):
            check_policy(redis_client(url), logging.getLogger("test.policy"), require_noeviction=True)
        _env(url, tmp_path, monkeypatch)
        result = CliRunner().invoke(main, ["status"], catch_exceptions=False)
        assert result.exit_code == 0 and "maxmemory-policy unknown" in result.output, result.output
        registry = CollectorRegistry()
        registry.register(RedisHealthCollector(redis_client(url)))
        assert b"capsnet_redis_eviction_policy_ok" not in generate_latest(registry)
    finally:
        managed.stop()


# ----------------------------------------------------------------------------- a full Redis mid-job


@pytest.mark.slow
def test_full_redis_mid_job_neither_kills_the_worker_nor_loses_the_result(
        server: RedisServer, ray_cluster: str, tmp_path: Path) -> None:
    admin = redis.Redis(port=server.port)
    # A lease far longer than the full-Redis window (renewals are refused meanwhile), also on a
    # loaded CI machine: this test is about the result surviving, not about lease expiry.
    queue = JobQueue(redis_client(server.url), Keys("capsnet:"), lease_seconds=300)
    job = queue.submit({**TINY_LENET, "epochs": 2, "train_subset": 2000, "max_retries": 0}, check_capacity=False)
    env = service_env(server.url, ray_cluster, tmp_path / "artifacts", CAPSNET_LEASE_SECONDS="300")
    worker = WorkerProcess("w-oom", env, tmp_path / "w-oom.log")
    try:
        wait_until(lambda: (r := queue.get(job.id)) and r.state == "running" and r.progress, 240, interval=0.1,
                   what="the job to train")
        _fill_until_oom(admin)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", "1")
        # The worker meets the full Redis (a refused heartbeat); the job trains on. Its result is
        # kept on disk first; `complete` may even get through while Redis is full (Redis lets a
        # script go on once its first write, a ZREM that frees memory, ran), else it waits.
        wait_until(lambda: "Redis is out of memory" in worker.output(), 120, interval=0.2,
                   what="the worker to meet the full Redis")
        pending = tmp_path / "artifacts" / job.id / "pending-result-1.json"
        wait_until(lambda: pending.exists() or queue.get(job.id).is_terminal, 420, interval=0.2,
                   what="the job's result")
        time.sleep(3)  # several refused heartbeats / registration refreshes
        assert worker.proc.poll() is None, worker.output()[-3000:]
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", "1")  # still full
        admin.config_set("maxmemory", 0)
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 120, interval=0.2,
                            what="the job to finish")
        assert record.state == "succeeded", (record.error, worker.output()[-3000:])
        assert [t["state"] for t in record.transitions].count("succeeded") == 1
        assert not pending.exists()
        output = worker.output()
        # (the "accepts writes again" line comes only when a call that was refused goes through
        # later: here the refused heartbeat ended with the job, see test_oom_is_transient...)
        assert output.count("Redis is out of memory") == 1, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert worker.proc.poll() is None
        # Its registration lapsed while Redis refused the refreshes; the worker announces itself
        # again once writes go through (after the job's teardown on a loaded machine).
        wait_until(lambda: any(w.get("id") == "w-oom" for w in queue.workers()), 90, interval=0.5,
                   what="the worker to register again")
    finally:
        worker.stop()
