"""Helpers for end-to-end tests: a real local Ray cluster owned by the test process, and
``capsctl worker`` processes (real subprocesses, so they can be SIGKILLed) attached to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.config import ray_node_env
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys

WORKER_CODE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO);"
    "from services.config import Settings; from services.worker.worker import Worker;"
    "Worker(Settings.from_env(), worker_id=sys.argv[1]).run()"
)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster started by this test process; yields its address for RAY_ADDRESS."""
    import ray

    if ray.is_initialized():  # another test module's copy of this fixture started it: share it
        yield ray.get_runtime_context().gcs_address
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(ray_node_env())  # as `capsctl up` starts Ray: ranks at normal priority
    # 4 logical CPUs on a 2-core machine: a 2-rank DDP job plus room for a second worker's claim.
    context = ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="WARNING", configure_logging=False,
                       log_to_driver=False)
    address = context.address_info["gcs_address"]
    try:
        yield address
    finally:
        ray.shutdown()


def service_env(redis_url: str, ray_address: str, artifacts: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CAPSNET_REDIS_URL": redis_url, "RAY_ADDRESS": ray_address, "CAPSNET_ARTIFACTS": str(artifacts),
        "CAPSNET_METRICS_PORT": "0", "CAPSNET_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "CAPSNET_LEASE_SECONDS": "6", "CAPSNET_HEARTBEAT_SECONDS": "1",
    })
    env.update(extra)
    return env


@pytest.fixture
def queue(redis_url: str) -> JobQueue:
    """The job queue on the test's clean Redis database, with a short lease (workers get 6 s too)."""
    return JobQueue(redis_client(redis_url), Keys("capsnet:"), lease_seconds=6)


@pytest.fixture
def workers(redis_url: str, ray_cluster: str, tmp_path: Path) -> Iterator[Callable[[str], WorkerProcess]]:
    """Start `capsctl worker` processes on demand (``workers("w-1")``); stopped after the test."""
    started: list[WorkerProcess] = []

    def start(worker_id: str) -> WorkerProcess:
        env = service_env(redis_url, ray_cluster, tmp_path / "artifacts")
        proc = WorkerProcess(worker_id, env, tmp_path / f"{worker_id}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class WorkerProcess:
    def __init__(self, worker_id: str, env: dict[str, str], log_path: Path) -> None:
        self.worker_id = worker_id
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, worker_id], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the worker: no goodbye, no cleanup, like a machine that vanished."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
