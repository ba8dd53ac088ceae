"""Is the artifact store (``CAPSNET_ARTIFACTS``) fit to take a job's checkpoints?

A worker whose store is read-only or full would fail every job it claims within seconds, each
failure spending a retry, so it probes the store at start and before each claim and claims
nothing while the probe fails (``services.worker.worker``): a small write and delete in the store, and
its free space (``shutil.disk_usage``) against ``CAPSNET_ARTIFACTS_MIN_FREE_BYTES``. The result
is shown in the worker's registration (``capsctl workers``/``status``: ``unhealthy: artifacts
read-only``) and as ``capsnet_artifacts_writable``. Remote stores (``s3://``...) are not probed.

``storage_fault`` tells whether a run's error is the store's fault (full, read-only, permission
refused where the store now fails the probe): the worker hands such a job back (``max_lost``)
instead of failing it (``max_retries``).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.artifacts import is_uri as artifacts_is_uri
from services.runs.error_text import STORAGE_DENIED, STORAGE_FULL, STORAGE_READ_ONLY, RootCause

PROBE_BYTES = 4096  # enough to hit ENOSPC on a full file system (an empty file needs no block)
# How long a probe result is reused: a worker's loop may pass the claim several times a second.
PROBE_MAX_AGE_S = 1.0


def is_remote(artifacts: str | Path) -> bool:
    return artifacts_is_uri(str(artifacts))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns at GiB


@dataclass(frozen=True)
class StoreHealth:
    """One probe of the artifact store. ``problem`` is None when it is fit for a job."""

    problem: str | None = None  # "artifacts read-only", "artifacts full (...)", ...
    free_bytes: int | None = None
    checked_at: float = 0.0  # time.monotonic()

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        """What ``capsctl workers`` shows: ``healthy`` or ``unhealthy: artifacts read-only``."""
        return "healthy" if self.problem is None else f"unhealthy: {self.problem}"


def _problem_of(error: OSError) -> str:
    code = error.errno
    if code in STORAGE_READ_ONLY:
        return "artifacts read-only"
    if code in STORAGE_FULL:
        return "artifacts full"
    if code in STORAGE_DENIED:
        return "artifacts not writable (permission denied)"
    return f"artifacts not writable ({error.strerror or error})"


def probe_artifacts(artifacts: str | Path, min_free_bytes: int) -> StoreHealth:
    """Create the store's folder if missing, write and delete a small file in it, and compare its
    free space with ``min_free_bytes`` (0: any). Never raises for the store's own faults."""
    now = time.monotonic()
    if is_remote(artifacts):
        return StoreHealth(checked_at=now)
    folder = Path(artifacts)
    probe = folder / f".capsctl-probe-{uuid.uuid4().hex[:12]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(os.urandom(PROBE_BYTES))  # random: no file system can compress it away
            handle.flush()
            os.fsync(handle.fileno())  # a delayed-allocation file system reports ENOSPC here
    except OSError as error:
        return StoreHealth(_problem_of(error), _free_bytes(folder), now)
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    free = _free_bytes(folder)
    if free is not None and free < min_free_bytes:
        return StoreHealth(f"artifacts full ({fmt_bytes(free)} free, below CAPSNET_ARTIFACTS_MIN_FREE_BYTES "
                           f"{fmt_bytes(min_free_bytes)})", free, now)
    return StoreHealth(None, free, now)


def _free_bytes(folder: Path) -> int | None:
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


class StoreMonitor:
    """The worker's view of its store: probes at most every ``max_age_s`` and calls
    ``on_change(health)`` when the verdict changes (the worker logs one line, refreshes its
    registration and its metric)."""

    def __init__(self, artifacts: str | Path, min_free_bytes: int,
                 on_change: Callable[[StoreHealth], None] | None = None, max_age_s: float = PROBE_MAX_AGE_S) -> None:
        self.artifacts = artifacts
        self.min_free_bytes = min_free_bytes
        self.on_change = on_change
        self.max_age_s = max_age_s
        self.last: StoreHealth | None = None

    def check(self, fresh: bool = False) -> StoreHealth:
        last = self.last
        if not fresh and last is not None and time.monotonic() - last.checked_at < self.max_age_s:
            return last
        health = probe_artifacts(self.artifacts, self.min_free_bytes)
        self.last = health
        if self.on_change is not None and (last is None or last.problem != health.problem):
            self.on_change(health)
        return health

    @property
    def status(self) -> str:
        return "unknown" if self.last is None else self.last.status


def storage_fault(cause: RootCause, monitor: StoreMonitor | None = None) -> str | None:
    """Why a run's root cause is the store's fault, or None when it is the job's own error: no
    space (ENOSPC, EDQUOT) or a read-only file system (EROFS) anywhere is never the job's fault;
    a permission refused (EACCES, EPERM) is the store's only while the store fails its probe (a
    job reading a file it may not read is its own error)."""
    code = cause.errno
    if code in STORAGE_FULL or code in STORAGE_READ_ONLY:
        return f"storage fault: {cause.line()}"
    if code in STORAGE_DENIED and monitor is not None and not monitor.check(fresh=True).ok:
        return f"storage fault: {cause.line()}"
    return None





__all__ = ["PROBE_BYTES", "StoreHealth", "StoreMonitor", "fmt_bytes", "is_remote",
           "probe_artifacts", "storage_fault"]
