"""A full or read-only artifact store fails clearly, once, and never black-holes the queue.

* The root cause of a failed run in one line (``services.runs.error_text``), on the real Ray
  exception classes ``trainer.fit()`` raises: an ``ActorDiedError`` of Ray Train's controller
  whose ``__init__`` raised (Ray keeps only its coloured text), a ``WorkerGroupError`` of rank
  errors, a ``ControllerError``, a ``RayTaskError``; colour codes stripped.
* The store probe (``services.worker.store_health``) on real tmpfs mounts: read-only, full, below the
  free-space threshold, healthy; which errors are the store's fault.
* End to end, a real ``capsctl worker`` on a real Ray cluster and redis-server: (a) with a
  read-only store it claims nothing, says ``unhealthy: artifacts read-only`` in ``capsctl
  workers`` and ``capsnet_artifacts_writable 0``, and once the store is remounted read-write it
  runs the job (``max_retries`` 0) to ``succeeded``; (b) a store that fills up mid-run hands the
  job back (one loss, no retry spent), and once space is freed the job resumes and succeeds
  (past the Ray Train run snapshot the full disk left torn, which is set aside).

The mounts need root (``mount -t tmpfs``); without it these tests skip, saying so.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from ray.exceptions import ActorDiedError, RayTaskError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from services.queue.jobqueue import JobQueue
from services.runs.error_text import cause_from_text, full_traceback, root_cause, strip_ansi
from services.worker.store_health import (
    StoreMonitor,
    probe_artifacts,
    storage_fault,
)

from ..service_helpers import WorkerProcess, service_env, wait_until

# ---------------------------------------------------------------------------- real tmpfs mounts


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


def _remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, size)``: a real tmpfs of ``size`` mounted at ``tmp_path / name``; unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        _mount_tmpfs(folder, size)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    """Write into ``folder`` until its file system is full; returns the filler file."""
    filler = folder / "filler"
    chunk = os.urandom(64 * 1024)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


# ---------------------------------------------------------------------------- the root cause, one line

RED, RESET = "\x1b[36m", "\x1b[39m"


def _remote(error: BaseException, proctitle: str = "ray::TrainController.__init__()") -> RayTaskError:
    """What Ray makes of ``error`` raised in a remote task or actor: a RayTaskError holding the
    remote traceback's text, its proctitle in terminal colours."""
    try:
        raise error
    except BaseException as raised:
        return RayTaskError("TrainController.__init__", traceback.format_exc(), raised, proctitle=proctitle,
                            actor_repr="<TrainController>")


def test_strip_ansi_removes_colour_and_cursor_codes() -> None:
    assert strip_ansi(f"{RED}ray::TrainController.__init__(){RESET} (pid=1)") == "ray::TrainController.__init__() (pid=1)"
    assert strip_ansi("\x1b[1;31mred\x1b[0m \x1b[2K\x1b]0;title\x07done") == "red done"
    assert strip_ansi("plain [Errno 30] text") == "plain [Errno 30] text"


def test_controller_that_died_in_init_names_its_oserror() -> None:
    # What fit() raised with a read-only store: Ray keeps only the text of the controller's error.
    died = ActorDiedError(_remote(OSError(errno.EROFS, "Read-only file system")))
    assert died.actor_init_failed and "\x1b[36m" in str(died)
    cause = root_cause(died)
    assert cause.line() == "controller: OSError: [Errno 30] Read-only file system"
    assert cause.errno == errno.EROFS
    full = full_traceback(died)
    assert "\x1b" not in full and "raise error" in full and "ray::TrainController.__init__()" in full
    # pyarrow's wording, as Ray Train's StorageContext raised it
    pyarrow = ActorDiedError(_remote(OSError(errno.EROFS, "Cannot create directory '/a/j1'. Detail: [errno 30] "
                                                          "Read-only file system")))
    assert root_cause(pyarrow).line().startswith("controller: OSError: [Errno 30] Cannot create directory '/a/j1'")


def test_rank_errors_name_the_lowest_failed_rank() -> None:
    group = WorkerGroupError("Rank 0 snippet...", {1: ValueError("collateral"),
                                                   0: OSError(errno.ENOSPC, "No space left on device")})
    cause = root_cause(group)
    assert cause.line() == "rank 0: OSError: [Errno 28] No space left on device" and cause.errno == errno.ENOSPC
    full = full_traceback(group)
    assert "[rank 0]" in full and "[rank 1]" in full and "collateral" in full
    own = WorkerGroupError("x", {0: ValueError("learning rate must be positive")})
    assert root_cause(own).line() == "rank 0: ValueError: learning rate must be positive"
    # A rank whose health check failed: the health check's own failure is the root.
    health = WorkerHealthCheckFailedError("A worker health check failed.", failure=RuntimeError("gloo hung"))
    assert root_cause(WorkerGroupError("x", {2: health})).line() == "rank 2: RuntimeError: gloo hung"


def test_controller_and_task_errors_unwrap_to_their_cause() -> None:
    remote = _remote(OSError(errno.ENOSPC, "No space left on device")).as_instanceof_cause()
    assert root_cause(remote).line() == "OSError: [Errno 28] No space left on device"
    assert root_cause(ControllerError(remote)).line() == "controller: OSError: [Errno 28] No space left on device"
    try:
        try:
            raise KeyError("epoch")
        except KeyError as inner:
            raise ControllerError(RuntimeError("checkpoint manager broke")) from inner
    except ControllerError as chained:
        assert root_cause(chained).line() == "controller: RuntimeError: checkpoint manager broke"
    # An error that is not Ray's wrapper is its own root: first line only, no colour codes.
    assert root_cause(ValueError(f"bad {RED}lr{RESET}\nsecond line")).line() == "ValueError: bad lr"
    assert cause_from_text("no exception here") is None


def test_storage_faults_are_told_from_the_jobs_own_errors(tmpfs) -> None:
    def line(error: BaseException) -> str | None:
        return storage_fault(root_cause(WorkerGroupError("x", {0: error})), monitor)

    healthy = tmpfs("ok", "1m")
    monitor = StoreMonitor(healthy, min_free_bytes=0)
    assert line(OSError(errno.ENOSPC, "No space left on device")).startswith("storage fault: rank 0: OSError")
    assert line(OSError(errno.EROFS, "Read-only file system")) is not None
    assert storage_fault(root_cause(ActorDiedError(_remote(OSError(errno.EROFS, "ro")))), monitor) is not None
    # Permission refused on a store that passes its probe: the job read what it may not read.
    assert line(PermissionError(errno.EACCES, "Permission denied")) is None
    assert line(ValueError("bad lr")) is None
    _remount(healthy, "ro")
    assert line(PermissionError(errno.EACCES, "Permission denied")) is not None


# ---------------------------------------------------------------------------- the store probe


def test_probe_of_real_read_only_full_and_healthy_stores(tmpfs) -> None:
    read_only = tmpfs("ro", "1m")
    _remount(read_only, "ro")
    health = probe_artifacts(read_only, min_free_bytes=0)
    assert not health.ok and health.status == "unhealthy: artifacts read-only"

    full = tmpfs("full", "1m")
    _fill(full)
    health = probe_artifacts(full, min_free_bytes=0)
    assert health.status == "unhealthy: artifacts full" and health.free_bytes == 0

    roomy = tmpfs("roomy", "1m")
    assert probe_artifacts(roomy, min_free_bytes=0).status == "healthy"
    low = probe_artifacts(roomy, min_free_bytes=2 * 1024 * 1024)
    assert low.status.startswith("unhealthy: artifacts full (") and "CAPSNET_ARTIFACTS_MIN_FREE_BYTES" in low.status
    assert list(roomy.iterdir()) == []  # the probe leaves nothing behind
    assert probe_artifacts(roomy / "new" / "store", 0).ok and (roomy / "new" / "store").is_dir()
    assert probe_artifacts("s3://bucket/artifacts", 10**18).ok  # remote stores are not probed


def test_monitor_reports_each_change_once(tmpfs) -> None:
    store = tmpfs("store", "1m")
    seen: list[str] = []
    monitor = StoreMonitor(store, 0, on_change=lambda h: seen.append(h.status), max_age_s=0.0)
    for _ in range(3):
        monitor.check()
    _remount(store, "ro")
    for _ in range(3):
        monitor.check()
    _remount(store, "rw")
    monitor.check()
    assert seen == ["healthy", "unhealthy: artifacts read-only", "healthy"]


# ---------------------------------------------------------------------------- end to end

MIN_FREE = str(64 * 1024)


def _registration(queue: JobQueue, worker_id: str) -> dict | None:
    return next((w for w in queue.workers() if w.get("id") == worker_id), None)


def _scrape(info: dict) -> str:
    port = int(info["metrics_url"].rsplit(":", 1)[1].split("/")[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _gauge(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _capsctl(redis_url: str, *args: str) -> str:
    from services.cli import main

    result = CliRunner().invoke(main, list(args), env={"CAPSNET_REDIS_URL": redis_url}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _small_job(**kw: object) -> dict:
    return {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 256, "test_subset": 128,
            "eval_angles": [0], "max_retries": 0, **kw}


@pytest.mark.slow
def test_worker_with_a_read_only_store_claims_nothing_until_it_is_fixed(
        queue: JobQueue, redis_url: str, ray_cluster: str, tmpfs, tmp_path: Path) -> None:
    store = tmpfs("artifacts", "32m")
    _remount(store, "ro")
    job = queue.submit(_small_job())
    env = service_env(redis_url, ray_cluster, store, CAPSNET_ARTIFACTS_MIN_FREE_BYTES=MIN_FREE)
    worker = WorkerProcess("w-ro", env, tmp_path / "w-ro.log")
    try:
        info = wait_until(lambda: (w := _registration(queue, "w-ro")) and w.get("health", "").startswith("unhealthy")
                          and w, 120, what=f"the worker to report itself unhealthy; log:\n{worker.output()[-3000:]}")
        assert info["health"] == "unhealthy: artifacts read-only"
        listing = _capsctl(redis_url, "workers")
        assert "HEALTH" in listing and "unhealthy: artifacts read-only" in listing
        assert "every live worker is unhealthy" in _capsctl(redis_url, "status", job.id)
        metrics = _scrape(info)
        assert _gauge(metrics, "capsnet_artifacts_writable") == 0.0
        assert _gauge(metrics, "capsnet_workers_unhealthy") == 1.0
        time.sleep(3)  # several probes and claim turns: still nothing claimed, no retry spent
        record = queue.get(job.id)
        assert record.state == "queued" and record.attempt == 0 and record.error is None
        assert worker.output().count("claiming no job until it is fixed") == 1  # one line, not one per probe

        _remount(store, "rw")
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 180,
                            what=f"the job to finish; log:\n{worker.output()[-3000:]}")
        assert record.state == "succeeded", (record.error, worker.output()[-3000:])
        assert record.attempt == 1 and record.losses == 0
        assert _registration(queue, "w-ro")["health"] == "healthy"
        assert _gauge(_scrape(info), "capsnet_artifacts_writable") == 1.0
        assert queue.counters()["retries"] == 0
    finally:
        worker.stop()


@pytest.mark.slow
def test_store_that_fills_mid_run_hands_the_job_back(queue: JobQueue, redis_url: str, ray_cluster: str, tmpfs,
                                                     tmp_path: Path) -> None:
    store = tmpfs("artifacts", "32m")
    job = queue.submit(_small_job(epochs=4, train_subset=3000, test_subset=200, batch_size=64))
    env = service_env(redis_url, ray_cluster, store, CAPSNET_ARTIFACTS_MIN_FREE_BYTES=MIN_FREE)
    worker = WorkerProcess("w-full", env, tmp_path / "w-full.log")
    try:
        wait_until(lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 180, interval=0.1,
                   what=f"a first checkpoint; log:\n{worker.output()[-3000:]}")
        filler = _fill(store)
        record = wait_until(lambda: (r := queue.get(job.id)) and r.losses >= 1 and r, 120,
                            what=f"the job to be handed back; log:\n{worker.output()[-3000:]}")
        assert record.state == "queued" and record.max_retries == 0 and record.error is None
        handed_back = [t for t in record.transitions if t.get("state") == "queued"][-1]
        assert re.match(r"infrastructure lost: storage fault: (rank 0|controller): OSError: \[Errno 28\]",
                        handed_back["reason"]), handed_back
        assert "\x1b" not in handed_back["reason"]
        assert handed_back["cause"] == "storage" and record.cause == "storage"
        counters = queue.counters()
        assert counters["infrastructure_losses"] == 1 and counters["retries"] == 0
        info = wait_until(lambda: (w := _registration(queue, "w-full")) and w["health"] != "healthy" and w, 30,
                          what="the worker to report its full store")
        assert info["health"].startswith("unhealthy: artifacts full")
        time.sleep(2)
        assert queue.get(job.id).state == "queued"  # a full store claims nothing

        filler.unlink()
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 180,
                            what=f"the job to finish after space was freed; log:\n{worker.output()[-3000:]}")
        assert record.state == "succeeded", (record.error, worker.output()[-3000:])
        assert record.losses == 1 and record.attempt == 2 and queue.counters()["retries"] == 0
        assert [h["epoch"] for h in record.result["history"]] == [1, 2, 3, 4]
    finally:
        worker.stop()
