"""Shared test fixtures: the real MNIST data in ../shared/data and a real Redis server.

Every test that needs Redis gets its own ``redis-server`` child process on a free port
(started once per session), so the suite never touches a Redis the machine already runs
and works where none runs at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray cluster, worker processes and queue fixtures for the end-to-end tests.
pytest_plugins = ("tests.service_helpers",)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find_shared_data() -> Path | None:
    for candidate in (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"):
        if (candidate / "MNIST" / "raw").is_dir():
            return candidate
    return None


# Tests read the real datasets from ../shared/data and never download: point the
# library there before anything imports it.
_shared = _find_shared_data()
if _shared is not None and "CAPSNET_DATA_DIR" not in os.environ:
    os.environ["CAPSNET_DATA_DIR"] = str(_shared)
os.environ.setdefault("CAPSNET_OFFLINE", "1")

from services.stack.processes import free_port  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = os.environ.get("CAPSNET_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.fail("real MNIST not found: set CAPSNET_DATA_DIR or put ../shared/data beside the repo")
    return Path(root)


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the whole session; yields its base URL (db 0)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `bash .ci/run` or `apt-get install redis-server`")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean database on the session's Redis for one test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.flushdb()
    client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    """A capsctl Redis client (``services.queue.connection.redis_client``) on the test's clean database."""
    from services.queue.connection import redis_client

    c = redis_client(redis_url)
    yield c
    c.close()
