"""Redis outages against real services: a private redis-server per test that the test SIGKILLs
and restarts (AOF on, same directory and port), real `capsctl worker` processes, real Ray Train.

Also: the token fence when a lease expires while Redis is away (the old attempt's kept result
against a newer attempt), and one-line CLI errors for every kind of Redis-side failure."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from services.cli import main
from services.config import Settings
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.redis_retry import (
    Backoff,
    RedisRetry,
    RedisUnavailable,
    is_transient,
    no_retry_client_kwargs,
)
from services.worker.worker import Worker

from ..conftest import free_port
from ..service_helpers import WorkerProcess, service_env, wait_until

TINY_LENET = {"kind": "train", "model": "lenet5", "cpu_ranks": 1, "batch_size": 64, "test_subset": 300,
              "eval_angles": [0], "lr": 2e-3, "augment": "none"}


class RedisServer:
    """A private redis-server on a fixed port and directory, so it can be SIGKILLed and restarted
    with its data (AOF, as in production)."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
             "--appendonly", "yes", *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._answers(), 20, interval=0.05, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.AuthenticationError:
            return True
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


# ----------------------------------------------------------------------------- transient or not


def test_outage_replies_are_transient_and_misconfiguration_is_not(tmp_path: Path) -> None:
    """Real replies of a real redis-server: a refused connection, READONLY from a replica and
    BUSY from a long script are transient; a wrong password and WRONGTYPE are not."""
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(primary.port)).start()
    locked = RedisServer(tmp_path / "locked", None, "--requirepass", "right-password").start()
    try:
        errors: dict[str, BaseException] = {}

        def capture(name: str, fn) -> None:
            try:
                fn()
            except redis.RedisError as exc:
                errors[name] = exc

        capture("refused", lambda: redis.Redis(port=free_port(), **no_retry_client_kwargs()).ping())
        capture("readonly", lambda: redis.Redis(port=replica.port).set("k", "v"))
        capture("wrongtype", lambda: (redis.Redis(port=primary.port).set("s", "1"),
                                      redis.Redis(port=primary.port).hget("s", "f")))
        capture("wrongpass", lambda: redis.Redis(port=locked.port, password="nope").ping())
        # BUSY: a script that loops past busy-reply-threshold blocks every other client.
        redis.Redis(port=primary.port).config_set("busy-reply-threshold", 100)
        looping = threading.Thread(target=lambda: capture(
            "killed", lambda: redis.Redis(port=primary.port).eval("while true do end", 0)))
        looping.start()
        time.sleep(0.4)
        capture("busy", lambda: redis.Redis(port=primary.port).get("k"))
        redis.Redis(port=primary.port).script_kill()
        looping.join(timeout=10)
    finally:
        for server in (locked, replica, primary):
            server.stop()
    assert set(errors) == {"refused", "readonly", "wrongtype", "wrongpass", "busy", "killed"}, errors
    assert is_transient(errors["refused"]) and is_transient(errors["readonly"]) and is_transient(errors["busy"])
    assert not is_transient(errors["wrongtype"]) and not is_transient(errors["wrongpass"])


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(base=0.1, cap=10.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2
    assert all(5.0 <= d <= 10.0 for d in delays[8:])  # capped
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_call_waits_through_a_redis_restart_and_logs_one_line_each_way(private_redis: RedisServer,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    private_redis.start()
    client = redis_client(private_redis.url, **no_retry_client_kwargs())
    client.set("kept", "1")
    private_redis.kill()
    restarter = threading.Timer(1.5, private_redis.start)
    restarter.start()
    retry = RedisRetry()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="capsctl.redis"):
        assert retry.call(client.get, "kept", what="reading a key") == "1"  # AOF kept it
    restarter.join()
    assert 1.4 < time.monotonic() - started < 15
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "Redis unavailable" in lines[0] and "answers again" in lines[1], lines
    # attempt() never waits: while Redis is down it returns the default at once.
    private_redis.kill()
    started = time.monotonic()
    assert retry.attempt(client.get, "kept", what="reading", default="dropped") == "dropped"
    assert retry.attempt(client.get, "kept", what="reading", default="dropped") == "dropped"
    assert time.monotonic() - started < 2
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(RedisUnavailable):
        retry.call(client.get, "kept", what="reading", stop=stop)


# ----------------------------------------------------------------------------- the token fence


def _worker(url: str, artifacts: Path) -> Worker:
    return Worker(Settings.from_env({"CAPSNET_REDIS_URL": url, "CAPSNET_ARTIFACTS": str(artifacts),
                                     "CAPSNET_LEASE_SECONDS": "6", "CAPSNET_HEARTBEAT_SECONDS": "1"}),
                  worker_id="w-fence")


def _succeeded(queue: JobQueue, job_id: str) -> list[dict]:
    record = queue.get(job_id)
    assert record is not None
    return [t for t in record.transitions if t.get("state") == "succeeded"]


def test_lease_expired_during_outage_newer_attempt_wins(redis_url: str, tmp_path: Path) -> None:
    """Redis comes back with attempt 1's lease expired: requeue_expired runs first (another
    worker's claim), attempt 2 takes the job. Attempt 1's kept result is discarded; attempt 2's
    is recorded: one success."""
    queue = JobQueue(redis_client(redis_url), Keys("capsnet:"), lease_seconds=6)
    job = queue.submit({**TINY_LENET, "epochs": 1, "max_retries": 3})
    first = queue.claim("w-old")
    assert first is not None and first.job_id == job.id
    assert queue.requeue_expired(now=time.time() + 60) == [job.id]  # the lease ran out while Redis was away
    second = queue.claim("w-new")
    assert second is not None and second.attempt == first.attempt + 1
    worker = _worker(redis_url, tmp_path)
    assert not worker._record_result(job.id, first.attempt, first.token, {"from": "attempt 1"})
    assert worker._record_result(job.id, second.attempt, second.token, {"from": "attempt 2"})
    # and the other order: the stale result arriving last is still refused
    assert not worker._record_result(job.id, first.attempt, first.token, {"from": "attempt 1"})
    record = queue.get(job.id)
    assert record.state == "succeeded" and record.result == {"from": "attempt 2"}
    assert [t["attempt"] for t in _succeeded(queue, job.id)] == [second.attempt]


def test_lease_expired_during_outage_old_attempt_records_first(redis_url: str, tmp_path: Path) -> None:
    """Redis comes back with the lease expired but nobody has requeued it yet: the old attempt's
    complete still holds the token and wins; requeue_expired then finds nothing running, and no
    second attempt can start. A repeated complete (its first reply lost) is not a second success."""
    queue = JobQueue(redis_client(redis_url), Keys("capsnet:"), lease_seconds=6)
    job = queue.submit({**TINY_LENET, "epochs": 1, "max_retries": 3})
    first = queue.claim("w-old")
    worker = _worker(redis_url, tmp_path)
    assert worker._record_result(job.id, first.attempt, first.token, {"from": "attempt 1"})
    assert worker._record_result(job.id, first.attempt, first.token, {"from": "attempt 1"})  # reply-lost retry
    assert queue.requeue_expired(now=time.time() + 60) == []
    assert queue.claim("w-new") is None
    assert [t["attempt"] for t in _succeeded(queue, job.id)] == [first.attempt]


def test_kept_result_file_is_recorded_by_the_next_worker_to_start(redis_url: str, tmp_path: Path) -> None:
    """A worker stopped while Redis was away leaves its result next to the checkpoints; the next
    worker process records it with the token it holds (if that still holds the lease)."""
    queue = JobQueue(redis_client(redis_url), Keys("capsnet:"), lease_seconds=6)
    job = queue.submit({**TINY_LENET, "epochs": 1})
    stale_job = queue.submit({**TINY_LENET, "epochs": 1})
    claimed = queue.claim("w-gone")
    stale = queue.claim("w-gone")
    assert {claimed.job_id, stale.job_id} == {job.id, stale_job.id}
    worker = _worker(redis_url, tmp_path)
    kept = worker._keep_result(claimed, {"accuracy": 0.9})
    stale_file = worker._keep_result(stale, {"accuracy": 0.1})
    assert kept is not None and kept.parent == tmp_path / claimed.job_id
    assert json.loads(kept.read_text())["lease_token"] == claimed.token
    queue.cancel(stale.job_id)
    queue.mark_cancelled(stale.job_id, stale.token)  # that one ended otherwise meanwhile
    _worker(redis_url, tmp_path).record_pending_results()
    assert queue.get(claimed.job_id).state == "succeeded"
    assert queue.get(claimed.job_id).result == {"accuracy": 0.9}
    assert queue.get(stale.job_id).state == "cancelled" and not _succeeded(queue, stale.job_id)
    assert not kept.exists() and not stale_file.exists()


# ----------------------------------------------------------------------------- CLI: one line each


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_cli_gives_one_line_for_every_redis_side_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    plain = RedisServer(tmp_path / "plain").start()
    locked = RedisServer(tmp_path / "locked", None, "--requirepass", "right-password").start()
    web_port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(web_port)],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = {
        f"redis://127.0.0.1:{plain.port}/99": "DB index is out of range",
        f"redis://127.0.0.1:{web_port}/0": "does not answer in the Redis protocol",
        f"redis://:wrong@127.0.0.1:{locked.port}/0": "refused the credentials",
        f"redis://127.0.0.1:{locked.port}/0": "refused the credentials",  # no password at all
        f"rediss://127.0.0.1:{plain.port}/0": "TLS",
        f"redis://127.0.0.1:{free_port()}/0": "cannot reach Redis",
    }
    try:
        wait_until(lambda: _listening(web_port), 20, interval=0.05, what="the HTTP server")
        for url, expected in cases.items():
            slow_to_fail = url.startswith("rediss:")  # a TLS handshake with a plain server times out (3 s)
            for command in (["list"],) if slow_to_fail else (["list"], ["status", "j-none"], ["submit", "lenet5"]):
                res = CliRunner().invoke(main, ["--redis-url", url, *command])
                lines = res.output.strip().splitlines()
                assert res.exit_code == 1 and len(lines) == 1, (url, command, res.output)
                assert lines[0].startswith("Error: ") and expected in lines[0], (url, lines)
                assert "wrong@" not in lines[0]  # the password is redacted
        # `capsctl worker` fails fast too on what waiting cannot fix
        res = CliRunner().invoke(main, ["--redis-url", f"redis://127.0.0.1:{plain.port}/99", "worker"])
        assert res.exit_code == 1 and "DB index is out of range" in res.output
    finally:
        web.terminate()
        web.wait(timeout=10)
        plain.stop()
        locked.stop()


# ----------------------------------------------------------------------------- real outages, real jobs


def _start_worker(worker_id: str, server: RedisServer, ray_address: str, tmp_path: Path) -> WorkerProcess:
    env = service_env(server.url, ray_address, tmp_path / "artifacts")
    return WorkerProcess(worker_id, env, tmp_path / f"{worker_id}.log")


def _wait(worker: WorkerProcess, predicate, timeout: float, what: str):
    """wait_until, with the worker's log tail (read when it fails) in the message."""
    try:
        return wait_until(predicate, timeout, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker log:\n{worker.output()[-4000:]}") from None


def _finished(queue: JobQueue, job_id: str):
    try:
        record = queue.get(job_id)
    except redis.RedisError:
        return None
    return record if record is not None and record.is_terminal else None


@pytest.mark.slow
def test_redis_sigkill_mid_job_neither_kills_the_worker_nor_loses_the_result(
        private_redis: RedisServer, ray_cluster: str, tmp_path: Path) -> None:
    private_redis.start()
    queue = JobQueue(redis_client(private_redis.url), Keys("capsnet:"), lease_seconds=6)
    job = queue.submit({**TINY_LENET, "epochs": 3, "train_subset": 3000, "max_retries": 0})
    worker = _start_worker("w-outage", private_redis, ray_cluster, tmp_path)
    try:
        _wait(worker, lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 240,
              "a first checkpoint")
        private_redis.kill()
        time.sleep(6)  # longer than the 6 s lease
        assert worker.proc.poll() is None, worker.output()[-3000:]
        private_redis.start()  # same port, same directory: the AOF brings the queue back
        record = _wait(worker, lambda: _finished(queue, job.id), 240, "the job to finish")
        assert record.state == "succeeded", (record.error, worker.output()[-3000:])
        assert [t["state"] for t in record.transitions].count("succeeded") == 1
        assert [h["epoch"] for h in record.result["history"]] == [1, 2, 3]
        output = worker.output()
        assert "Redis unavailable" in output and "Redis answers again" in output
        assert "Traceback" not in output, output[-3000:]
        # ... and the same worker process serves the next job.
        assert worker.proc.poll() is None
        following = queue.submit({**TINY_LENET, "epochs": 1, "train_subset": 500})
        record = _wait(worker, lambda: _finished(queue, following.id), 240, "the next job")
        assert record.state == "succeeded" and record.worker == "w-outage"
        assert worker.proc.poll() is None
    finally:
        worker.stop()


@pytest.mark.slow
def test_worker_started_while_redis_is_down_waits_for_it(private_redis: RedisServer, ray_cluster: str,
                                                          tmp_path: Path) -> None:
    worker = _start_worker("w-early", private_redis, ray_cluster, tmp_path)
    try:
        _wait(worker, lambda: "Redis unavailable" in worker.output(), 120, "the worker to notice Redis is down")
        assert worker.proc.poll() is None, worker.output()[-3000:]
        private_redis.start()
        queue = JobQueue(redis_client(private_redis.url), Keys("capsnet:"), lease_seconds=6)
        job = queue.submit({**TINY_LENET, "epochs": 1, "train_subset": 500}, check_capacity=False)
        record = _wait(worker, lambda: _finished(queue, job.id), 240, "the job")
        assert record.state == "succeeded" and record.worker == "w-early"
        assert worker.proc.poll() is None and "Traceback" not in worker.output()
    finally:
        worker.stop()
