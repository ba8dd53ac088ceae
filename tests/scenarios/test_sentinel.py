"""Redis high availability against real processes: a primary, a replica and three Sentinels
(``redis-server --sentinel``) on free ports; ``redis+sentinel://`` URLs; and ``WAIT`` keeping
every acknowledged submit and completion through a failover onto a lagging replica."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from services.config import SentinelUrlError, Settings, SettingsError, parse_sentinel_url
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.redis_retry import is_transient
from services.queue.replication import NotReplicated
from services.stack.processes import free_port

from ..conftest import _wait_for_port

SERVICE = "capsnet"
SPEC = {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 64, "test_subset": 64}
CPU = {"gpus": 0, "cpus": 4}


def test_sentinel_urls_parse_or_fail_in_one_line() -> None:
    spec = parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/2")
    assert spec.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (spec.service_name, spec.db, spec.password) == ("mymaster", 2, "s3cret")
    assert parse_sentinel_url("redis+sentinel://h:1/svc?sentinel_password=x").sentinel_password == "x"
    for bad, why in [("redis+sentinel://h:1", "must name the monitored service"),
                     ("redis+sentinel://h/svc", "is not host:port"),
                     ("redis+sentinel://h:1/svc/x", "db 'x' is not a number"),
                     ("redis+sentinel:///svc", "no sentinel addresses")]:
        with pytest.raises(SentinelUrlError, match=why) as err:
            parse_sentinel_url(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(SettingsError, match=r"^CAPSNET_REDIS_URL: .*is not host:port"):
        Settings.from_env({"CAPSNET_REDIS_URL": "redis+sentinel://nohost/svc"})
    assert Settings.from_env({"CAPSNET_REDIS_WAIT": "1"}).redis_wait == 1
    assert is_transient(NotReplicated(0, 1, 100))  # recorded again until a replica has it


@dataclass
class RedisHA:
    """A primary, a replica and three Sentinels monitoring them, each a real process."""

    workdir: Path
    primary_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _server(self, name: str, port: int, *extra: str) -> None:
        folder = self.workdir / name
        folder.mkdir(exist_ok=True)
        self.procs[name] = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(port)

    def start(self) -> None:
        self._server("primary", self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        for n, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{n}.conf"  # Sentinel rewrites its own config file
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\nlogfile {self.workdir}/sentinel-{n}.log\n"
                            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                            # Long enough that a loaded machine's slow PING reply is not a dead
                            # primary (500 ms flip-flopped the primary every second under load).
                            f"sentinel down-after-milliseconds {SERVICE} 3000\n"
                            f"sentinel failover-timeout {SERVICE} 6000\n"
                            f"sentinel parallel-syncs {SERVICE} 1\n")
            self.procs[f"sentinel-{n}"] = subprocess.Popen(
                [shutil.which("redis-server"), str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for_port(port)
        replica = redis.Redis(port=self.replica_port)
        deadline = time.monotonic() + 20
        while replica.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        deadline = time.monotonic() + 20  # every Sentinel has found the replica
        while not all(redis.Redis(port=p).execute_command("SENTINEL", "REPLICAS", SERVICE) for p in self.sentinel_ports):
            assert time.monotonic() < deadline, "the Sentinels never saw the replica"
            time.sleep(0.1)
        # ...and both other Sentinels (their hello messages travel through the primary every 2 s):
        # a Sentinel that knows no peer can never reach the quorum, and with the primary dead its
        # peers can no longer be found, so a failover test started earlier would wait forever.
        deadline = time.monotonic() + 30
        while not all(len(redis.Redis(port=p).execute_command("SENTINEL", "SENTINELS", SERVICE)) == 2
                      for p in self.sentinel_ports):
            assert time.monotonic() < deadline, "the Sentinels never found each other"
            time.sleep(0.1)

    def primary_address(self) -> tuple[str, int]:
        host, port = redis.Redis(port=self.sentinel_ports[0], decode_responses=True).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return host, int(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[RedisHA]:
    cluster = RedisHA(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_a_sentinel_url_reaches_the_primary_and_wait_confirms_a_replica(ha: RedisHA) -> None:
    client = redis_client(ha.url)
    assert int(client.info("server")["tcp_port"]) == ha.primary_port  # the Sentinels' primary
    queue = JobQueue(client, Keys("t:"), wait_replicas=1, wait_timeout_ms=2000)
    job = queue.submit(SPEC)
    claimed = queue.claim("w1", CPU)
    assert claimed.id == job.id and queue.complete(job.id, claimed.token, {"ok": True})
    replica = JobQueue(redis_client(f"redis://127.0.0.1:{ha.replica_port}/0"), Keys("t:"))
    assert replica.get(job.id).state == "succeeded"  # WAIT returned: the replica has it already
    # Recording the same outcome again (a lost reply, a WAIT that timed out) answers the same.
    assert queue.complete(job.id, claimed.token, {"ok": True}) and not queue.fail(job.id, claimed.token, "late")
    # With the replica stopped, a submit is taken but not acknowledged: one clear error.
    os.kill(ha.procs["replica"].pid, signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated, match=r"not yet replicated: 0 of 1 replica\(s\) confirmed within 300 ms"):
            JobQueue(client, Keys("t:"), wait_replicas=1, wait_timeout_ms=300).submit(SPEC)
    finally:
        os.kill(ha.procs["replica"].pid, signal.SIGCONT)


@dataclass
class Tally:
    acked_submits: set[str] = field(default_factory=set)
    acked_completions: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _retry(call, stop: threading.Event, deadline: float):  # noqa: ANN001, ANN202
    """Call until it answers: what a worker does through RedisRetry (transient errors wait and retry)."""
    while time.monotonic() < deadline and not stop.is_set():
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError, NotReplicated,
                redis.ResponseError) as exc:
            if not is_transient(exc):
                raise
            time.sleep(0.05)
    raise TimeoutError("no answer before the deadline")


def run_failover(ha: RedisHA, wait: int, jobs: int = 200) -> dict[str, int]:
    """Submit and complete ``jobs`` jobs while the primary dies with its replica 1 s behind;
    count what was acknowledged and is gone afterwards."""
    client = redis_client(ha.url, socket_timeout=1.0, socket_connect_timeout=0.5)
    queue = JobQueue(client, Keys("t:"), lease_seconds=300, wait_replicas=wait, wait_timeout_ms=300)
    tally, stop = Tally(), threading.Event()
    deadline = time.monotonic() + 120

    def submitter() -> None:
        for n in range(jobs):
            try:  # an idempotency key: a submit retried after an unknown outcome makes no duplicate
                record = _retry(lambda n=n: queue.submit(SPEC, idempotency_key=f"job-{n}"), stop, deadline)
            except Exception as exc:  # noqa: BLE001 - reported below
                tally.errors.append(f"submit {n}: {exc}")
                return
            tally.acked_submits.add(record.id)

    def completer() -> None:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                claimed = _retry(lambda: queue.claim("w1", CPU), stop, deadline)
            except TimeoutError:
                return
            if claimed is None:
                if len(tally.acked_completions) >= jobs:
                    return
                time.sleep(0.01)
                continue
            try:
                if _retry(lambda c=claimed: queue.complete(c.id, c.token, {"ok": True}), stop, deadline):
                    tally.acked_completions.add(claimed.id)
            except TimeoutError:
                return

    threads = [threading.Thread(target=submitter), threading.Thread(target=completer)]
    for t in threads:
        t.start()
    while len(tally.acked_submits) < jobs // 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    replica, primary = ha.procs["replica"], ha.procs["primary"]
    os.kill(replica.pid, signal.SIGSTOP)  # the replica falls behind: stopped, its link cut, so what
    redis.Redis(port=ha.primary_port).client_kill_filter(_type="replica")  # is written now stays on the primary
    time.sleep(1.0)
    primary.kill()                        # ...and the primary dies before it catches up
    primary.wait()
    os.kill(replica.pid, signal.SIGCONT)
    while ha.primary_address()[1] != ha.replica_port and time.monotonic() < deadline:
        time.sleep(0.05)
    # The operator brings the old primary back, empty, as the new primary's replica: until then
    # WAIT 1 cannot be met, and acknowledgements wait (the price of the guarantee).
    ha._server("primary", ha.primary_port, "--replicaof", "127.0.0.1", str(ha.replica_port))
    for t in threads[:1]:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    while len(tally.acked_completions) < len(tally.acked_submits) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert ha.primary_address()[1] == ha.replica_port, "no failover happened"
    survivor = JobQueue(redis_client(f"redis://127.0.0.1:{ha.replica_port}/0"), Keys("t:"))
    lost_submits = sum(1 for j in tally.acked_submits if survivor.get(j) is None)
    lost_completions = sum(1 for j in tally.acked_completions
                           if (r := survivor.get(j)) is None or r.state != "succeeded")
    twice = 0
    for j in tally.acked_submits:
        record = survivor.get(j)
        if record is not None and sum(1 for t in record.transitions if t.get("state") == "succeeded") > 1:
            twice += 1
    return {"acked_submits": len(tally.acked_submits), "acked_completions": len(tally.acked_completions),
            "lost_submits": lost_submits, "lost_completions": lost_completions, "succeeded_twice": twice,
            "errors": len(tally.errors), "first_error": tally.errors[:1]}


@pytest.mark.slow
def test_with_wait_no_acknowledged_write_is_lost_when_the_primary_fails_over_behind(ha: RedisHA) -> None:
    figures = run_failover(ha, wait=1)
    print(f"\nWAIT 1 through a failover onto a replica 1 s behind: {figures}")
    assert figures["errors"] == 0 and figures["acked_submits"] == 200, figures
    assert figures["lost_submits"] == 0 and figures["lost_completions"] == 0, figures
    assert figures["succeeded_twice"] == 0 and figures["acked_completions"] == 200, figures


@pytest.mark.slow
def test_without_wait_the_same_failover_can_lose_acknowledged_writes(ha: RedisHA) -> None:
    """The contrast the README reports (not asserted: how much is lost depends on timing)."""
    figures = run_failover(ha, wait=0)
    print(f"\nWAIT 0 through the same failover: {figures}")
    assert figures["acked_submits"] > 0
