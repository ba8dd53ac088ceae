"""Is this Redis fit to hold the queue? Memory against ``maxmemory``, and the eviction policy.

The queue needs every key it wrote to stay until it deletes it: an evicting Redis
(``maxmemory-policy`` other than ``noeviction``) silently drops job records (jobs stuck
``queued`` forever) and idempotency keys (repeated submits create duplicate jobs), as Sidekiq
and BullMQ warn too. With ``noeviction``, a full Redis refuses writes instead (``OOM``), which
the service rides out (``services.queue.redis_retry``). So workers and ``capsctl up`` read the
policy at start and every few minutes and warn loudly on anything else;
``CAPSNET_REQUIRE_NOEVICTION=1`` makes a worker refuse to start instead.

Managed Redis often disables ``CONFIG``: the policy and limit are then read from ``INFO
memory`` (``maxmemory_policy``, ``maxmemory``), and when neither can be read they are
"unknown", never an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

NOEVICTION = "noeviction"
MEMORY_WARN_RATIO = 0.9  # warn when used memory is above this share of maxmemory
POLICY_CHECK_S = 300.0  # how often a worker reads the policy again


class EvictionPolicyRefused(Exception):
    """``CAPSNET_REQUIRE_NOEVICTION=1`` and Redis evicts (or its policy cannot be read). One line."""


@dataclass(frozen=True)
class RedisHealth:
    used_memory: int | None  # bytes (INFO memory used_memory); None = unknown
    maxmemory: int | None  # bytes, 0 = no limit; None = unknown
    policy: str | None  # maxmemory-policy; None = unknown
    source: str  # where the policy came from: "config", "info" or "unknown"

    @property
    def policy_ok(self) -> bool | None:
        """True for ``noeviction``, False for an evicting policy, None when unknown."""
        return None if self.policy is None else self.policy == NOEVICTION

    @property
    def memory_ratio(self) -> float | None:
        if not self.maxmemory or self.used_memory is None:
            return None  # no limit, or unknown
        return self.used_memory / self.maxmemory

    def policy_warning(self) -> str | None:
        if self.policy_ok is False:
            return (f"Redis maxmemory-policy is {self.policy}, not noeviction: Redis may evict job records and "
                    f"idempotency keys (jobs stuck queued, duplicate jobs); set `maxmemory-policy noeviction`")
        return None

    def memory_warning(self) -> str | None:
        ratio = self.memory_ratio
        if ratio is not None and ratio > MEMORY_WARN_RATIO:
            return (f"Redis memory is at {ratio:.0%} of maxmemory ({fmt_bytes(self.used_memory)} of "
                    f"{fmt_bytes(self.maxmemory)}): writes are refused at 100%; raise maxmemory or free memory")
        return None

    def warnings(self) -> list[str]:
        return [w for w in (self.policy_warning(), self.memory_warning()) if w]

    def memory_text(self) -> str:
        """``12.0 MiB of 100.0 MiB maxmemory (12%)``, or with no limit / unknown said so."""
        used = fmt_bytes(self.used_memory)
        if self.maxmemory is None:
            return f"{used} used, maxmemory unknown"
        if self.maxmemory == 0:
            return f"{used} used, no maxmemory limit"
        return f"{used} of {fmt_bytes(self.maxmemory)} maxmemory ({self.memory_ratio or 0.0:.0%})"

    def policy_text(self) -> str:
        if self.policy is None:
            return "maxmemory-policy unknown (CONFIG and INFO unreadable)"
        return f"maxmemory-policy {self.policy}" + ("" if self.policy_ok else "  WARNING: evicting")

    def to_dict(self) -> dict[str, Any]:
        return {"used_memory_bytes": self.used_memory, "maxmemory_bytes": self.maxmemory,
                "memory_ratio": self.memory_ratio, "maxmemory_policy": self.policy or "unknown",
                "policy_source": self.source, "eviction_policy_ok": self.policy_ok, "warnings": self.warnings()}


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(_text(value) or "")
    except ValueError:
        return None


def read_health(client: redis.Redis) -> RedisHealth:
    """Memory and policy of the Redis behind ``client``. CONFIG GET first (what is configured),
    INFO memory when CONFIG is disabled or not allowed; fields neither answers are None. Raises
    only connection errors (the caller's Redis is down, not misconfigured)."""
    info: dict[str, Any] = {}
    try:
        info = dict(client.info("memory"))
    except redis.ResponseError:  # INFO renamed away or not allowed (ACL): leave it unknown
        pass
    policy, maxmemory, source = None, None, "unknown"
    try:
        config = {_text(k): v for k, v in dict(client.config_get("maxmemory*")).items()}
        policy, maxmemory = _text(config.get("maxmemory-policy")), _int(config.get("maxmemory"))
        source = "config" if policy else source
    except redis.ResponseError:  # CONFIG disabled (managed Redis) or not allowed: INFO has them too
        pass
    if policy is None and info.get("maxmemory_policy"):
        policy, source = _text(info["maxmemory_policy"]), "info"
    if maxmemory is None:
        maxmemory = _int(info.get("maxmemory"))
    return RedisHealth(used_memory=_int(info.get("used_memory")), maxmemory=maxmemory, policy=policy,
                       source=source)


def check_policy(client: redis.Redis, log: logging.Logger, *, require_noeviction: bool = False) -> RedisHealth:
    """Read the health and log its warnings (loud: WARNING, every check). With
    ``require_noeviction``, raise ``EvictionPolicyRefused`` unless the policy is ``noeviction``."""
    health = read_health(client)
    if require_noeviction and health.policy_ok is not True:
        what = "cannot be read (CONFIG and INFO refused)" if health.policy is None else f"is {health.policy}"
        raise EvictionPolicyRefused(f"Redis maxmemory-policy {what}, and CAPSNET_REQUIRE_NOEVICTION=1 requires "
                                    f"noeviction: run `CONFIG SET maxmemory-policy noeviction` (and persist it "
                                    f"in redis.conf) or unset CAPSNET_REQUIRE_NOEVICTION")
    for warning in health.warnings():
        log.warning("%s", warning)
    if health.policy is None:
        log.warning("Redis maxmemory-policy unknown (CONFIG and INFO refused): make sure it is noeviction")
    return health


class PolicyWatch:
    """``check_policy`` again once ``interval`` seconds have passed (``maybe_check``)."""

    def __init__(self, client: redis.Redis, log: logging.Logger, interval: float = POLICY_CHECK_S) -> None:
        self.client = client
        self.log = log
        self.interval = interval
        self._last = time.monotonic()
        self.health: RedisHealth | None = None

    def maybe_check(self) -> None:
        if time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        try:
            self.health = check_policy(self.client, self.log)
        except redis.RedisError as exc:  # an outage: the next check tries again
            self.log.debug("Redis health check failed: %s", exc)


__all__ = ["MEMORY_WARN_RATIO", "NOEVICTION", "POLICY_CHECK_S", "EvictionPolicyRefused", "PolicyWatch",
           "RedisHealth", "check_policy", "fmt_bytes", "read_health"]
