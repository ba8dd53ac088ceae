"""The worker registry: which workers are alive and what they can offer.

A worker announces itself with a TTL'd JSON key plus a member of the ``workers`` sorted set
(score = expiry, Redis time); a worker that stops refreshing drops out when its TTL ends, so a
crashed host needs no cleanup. Submit's capacity check and ``capsctl workers``/``cluster`` read
it. The job queue (``services.queue.jobqueue``) keeps thin ``register_worker``/``workers``/... methods
that delegate here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from services.queue import parsing
from services.queue.keys import Keys

# Every value read from Redis goes through these total parsers (services.queue.parsing): junk
# becomes None or a default, never an exception.
_s = parsing.text
_f = parsing.finite
_json = parsing.json_value


def server_time(client: redis.Redis) -> float:
    """Redis server time, so hosts with skewed clocks agree on registration expiry."""
    secs, micros = client.time()
    return int(secs) + int(micros) / 1e6


class WorkerRegistry:
    """Live workers under one key prefix. Thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def register(self, worker_id: str, info: Mapping[str, Any], ttl: float) -> None:
        """Announce (or refresh) a live worker for ``ttl`` s.

        ``info`` is free-form JSON; the queue reads ``resources`` = ``{"gpus", "cpus"}`` (what the
        worker can ever offer, for submit's capacity check). Conventional keys: ``hostname``,
        ``pid``, ``available``, ``current_job``, ``started_at``, ``health`` (``"healthy"``, or
        ``"unhealthy: <why>"`` while the worker claims nothing, e.g. its artifact store is read-only).
        """
        ttl = float(ttl)
        now = server_time(self.client)
        payload = {**dict(info), "id": worker_id, "seen_at": now, "expires_at": now + ttl}
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.worker(worker_id), json.dumps(payload, separators=(",", ":"), default=str),
                 px=max(1, int(ttl * 1000)))
        pipe.zadd(self.keys.workers, {worker_id: now + ttl})
        pipe.execute()

    def unregister(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.worker(worker_id))
        pipe.zrem(self.keys.workers, worker_id)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' info dicts (expired registrations are pruned), sorted by id.

        A registration that is not a JSON object is listed as ``{"id", "invalid": why}``; one whose
        key is gone (or not a string) is left out.
        """
        now = server_time(self.client)
        try:
            self.client.zremrangebyscore(self.keys.workers, "-inf", now)
            ids = [_s(x) for x in self.client.zrange(self.keys.workers, 0, -1)]
        except redis.ResponseError as err:  # the registry is not a sorted set: nobody is registered
            if not parsing.wrong_type(err):
                raise
            return []
        if not ids:
            return []
        values = self.client.mget([self.keys.worker(w) for w in ids])  # type: ignore[arg-type]
        out = []
        for worker_id, raw in zip(ids, values, strict=True):
            if raw is None:
                continue
            info = _json(raw, None)
            if not isinstance(info, dict):
                info = {"invalid": "registration is not a JSON object"}
            info.setdefault("id", worker_id)
            out.append(info)
        return sorted(out, key=lambda w: parsing.printable(w.get("id")))

    def cluster_capacity(self) -> dict[str, Any]:
        """Totals published by live workers: ``{"workers", "gpus", "cpus", "max_gpus", "max_cpus",
        "shapes": [(gpus, cpus) per worker]}``. Workers whose resources are not finite numbers
        >= 0 are left out (``worker_resources`` is None for them)."""
        shapes = [shape for info in self.workers() if (shape := worker_resources(info)) is not None]
        return {
            "workers": len(shapes),
            "gpus": sum(g for g, _ in shapes), "cpus": sum(c for _, c in shapes),
            "max_gpus": max((g for g, _ in shapes), default=0), "max_cpus": max((c for _, c in shapes), default=0),
            "shapes": shapes,
        }


def worker_health(info: Mapping[str, Any]) -> str:
    """A registration's health as one printable line: ``healthy``, ``unhealthy: artifacts
    read-only``, or ``-`` for a worker that does not report one (an older version)."""
    health = info.get("health")
    return parsing.printable(health)[:120] if isinstance(health, str) and health else "-"


def is_unhealthy(info: Mapping[str, Any]) -> bool:
    health = info.get("health")
    return isinstance(health, str) and health.startswith("unhealthy")


def resource_shape(res: Any) -> tuple[float, float] | None:
    """``(gpus, cpus)`` of a ``{"gpus", "cpus"}`` mapping (missing or empty = 0), or None when
    it is not a mapping or either value is not a finite number >= 0 (``"nan"``, ``-1``, junk)."""
    if not isinstance(res, Mapping):
        return None
    values = []
    for name in ("gpus", "cpus"):
        raw = res.get(name)
        value = 0.0 if raw is None or raw == "" else _f(raw)
        if value is None or value < 0:
            return None
        values.append(value)
    return values[0], values[1]


def worker_resources(info: Mapping[str, Any]) -> tuple[float, float] | None:
    """What a registered worker can ever offer: its ``resources`` (or, in older registrations,
    the info itself); None when that is unreadable, so it counts towards no capacity."""
    if info.get("invalid"):  # an unreadable registration (see WorkerRegistry.workers)
        return None
    res = info.get("resources")
    return resource_shape(res if isinstance(res, Mapping) else info)


__all__ = ["WorkerRegistry", "is_unhealthy", "resource_shape", "server_time", "worker_health", "worker_resources"]
