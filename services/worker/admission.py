"""Admission: one worker at a time turns free Ray capacity into a claimed job.

Several workers drive one Ray cluster. Each reads ``ray.available_resources()`` and claims a job
that fits; without coordination, N workers read the same free CPUs before any of their jobs'
placement groups exist, all claim, and the jobs that do not fit wait inside Ray while Redis
says ``running`` (holding a lease, out of reach of priorities). So admission is serialised per
queue (one Redis prefix = one Ray cluster) by a short lock:

1. a worker takes the lock (``SET NX PX`` with a random token);
2. reads the cluster's free resources and claims the highest-priority oldest job that fits
   (``JobQueue.claim``; nothing fits: it lets go at once);
3. keeps the lock until the job's resources are seen reserved in Ray (``reserved``: a new
   placement group that covers the demand is CREATED, or the free resources have dropped by
   the demand), the attempt ends, or ``timeout`` passes; then lets go, and the next worker
   reads a free count that already excludes this job.

The lock expires by itself after a short ``ttl`` that its holder renews while it waits: a
worker that dies mid-admission blocks admissions for at most one ``ttl`` (seconds), its job's lease expires and the job is re-queued, and
Ray frees whatever the dead driver had reserved. The release is token-checked, so a holder that
overran its TTL never deletes a newer holder's lock.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from services.queue.keys import Keys
from services.queue.scripts import Scripts

# Ray's free counts are floats (fractional resources): compare with some slack.
_EPSILON = 1e-6


class AdmissionLock:
    """The per-queue admission lock (``Keys.admission``)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self.client = client
        self.key = keys.admission
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._scripts = Scripts(client, keys)  # the lock's scripts are in services/queue/queue.lua

    def acquire(self) -> str | None:
        """The lock's token when this caller now holds it, None when another worker does."""
        token = secrets.token_hex(12)
        return token if int(self._scripts.run("admission_acquire", [token, self.ttl_ms])) else None

    def renew(self, token: str) -> bool:
        """Restart the TTL while still the holder; False when the lock was lost meanwhile."""
        return bool(self._scripts.run("admission_renew", [token, self.ttl_ms]))

    def release(self, token: str) -> bool:
        """Let go; False when the lock had already expired (or passed to another holder)."""
        return bool(self._scripts.run("admission_release", [token]))


# Placement-group states whose bundles hold (or, rescheduling after a node loss, are about to
# hold again) their resources.
_HOLDING = ("CREATED", "RESCHEDULING")


def _group_held(group: Mapping[str, Any]) -> dict[str, float]:
    bundles = group.get("bundles") or {}
    return {"gpus": sum(float(b.get("GPU", 0) or 0) for b in bundles.values()),
            "cpus": sum(float(b.get("CPU", 0) or 0) for b in bundles.values())}


def free_of(available: Mapping[str, float], total: Mapping[str, float] | None = None,
            groups: Iterable[Mapping[str, Any]] = ()) -> dict[str, float]:
    """``{"gpus", "cpus"}`` free, from a ``ray.available_resources()`` mapping.

    With ``total`` (``ray.cluster_resources()``) and ``groups`` (the placement-group table),
    the lower of two views: Ray's free counts, and the total less what every created placement
    group holds. ``ray.available_resources()`` is the GCS's copy of the raylets' reports, which
    lags behind the placement-group table (the GCS marks a group CREATED itself, the node's
    report of the reservation comes later; under load seconds later): read alone, the free
    count right after a job's group is created still includes that job's CPUs, and the next
    worker claims a job that then waits inside Ray while Redis says ``running``."""
    free = {"gpus": float(available.get("GPU", 0) or 0), "cpus": float(available.get("CPU", 0) or 0)}
    if total is None:
        return free
    left = {"gpus": float(total.get("GPU", 0) or 0), "cpus": float(total.get("CPU", 0) or 0)}
    for group in groups:
        if group.get("state") in _HOLDING:
            held = _group_held(group)
            left = {r: left[r] - held[r] for r in left}
    return {r: max(0.0, min(free[r], left[r])) for r in free}


def reserved(need: Mapping[str, float], free_before: Mapping[str, float], free_now: Mapping[str, float],
             new_groups: Iterable[Mapping[str, Any]] = ()) -> bool:
    """Whether a job needing ``need`` (``{"gpus", "cpus"}``) holds its resources in Ray now.

    ``free_before``: free resources when it was claimed; ``free_now``: free resources now;
    ``new_groups``: placement groups created since the claim (``ray.util.placement_group_table()``
    entries). True when one of those is CREATED and covers the demand (Ray Train's worker
    group), or when the free resources have dropped by at least the demand (a Ray task, Tune's
    trials). A job that finished meanwhile frees resources and hides the drop: the caller's
    timeout covers that case."""
    for group in new_groups:
        if group.get("state") != "CREATED":
            continue
        held = _group_held(group)
        if all(held[r] + _EPSILON >= float(need.get(r, 0)) for r in ("gpus", "cpus")):
            return True
    return all(float(free_now.get(r, 0)) <= float(free_before.get(r, 0)) - float(need.get(r, 0)) + _EPSILON
               for r in ("gpus", "cpus"))


def _plural(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def shortfall(need: Mapping[str, float], free: Mapping[str, float] | None) -> str | None:
    """Why a queued job needing ``need`` cannot be admitted now, e.g. "waiting for 2 CPUs;
    cluster has 1 free", or None when it fits in ``free`` (or nothing is known about it)."""
    if free is None:
        return None
    for resource, unit in (("gpus", "GPU"), ("cpus", "CPU")):
        wanted, have = float(need.get(resource, 0)), float(free.get(resource, 0))
        if wanted > have + _EPSILON:
            return f"waiting for {_plural(wanted, unit)}; cluster has {have:g} free"
    return None


__all__ = ["AdmissionLock", "free_of", "reserved", "shortfall"]
