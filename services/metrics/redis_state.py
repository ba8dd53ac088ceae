"""Redis health at scrape time (``RedisHealthCollector``): memory against ``maxmemory`` and
whether the eviction policy is ``noeviction`` (see ``services.queue.redis_health``). Every worker
exposes the same values: aggregate with ``max`` (memory) and ``min`` (policy ok)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.queue.redis_health import read_health

log = logging.getLogger(__name__)

_USED = ("capsnet_redis_memory_used_bytes", "Memory Redis uses (INFO memory used_memory).")
_MAX = ("capsnet_redis_maxmemory_bytes", "Redis maxmemory (0 = no limit; writes are refused beyond it).")
_POLICY_OK = ("capsnet_redis_eviction_policy_ok",
              "1 if Redis maxmemory-policy is noeviction, 0 if Redis may evict queue keys (left out when unknown).")


class RedisHealthCollector(Collector):
    def __init__(self, client: object) -> None:
        self.client = client

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(name, doc) for name, doc in (_USED, _MAX, _POLICY_OK)]

    def collect(self) -> Iterator[Metric]:
        try:
            health = read_health(self.client)  # type: ignore[arg-type]
        except Exception as exc:  # a broken Redis must not break the rest of /metrics (capsnet_redis_up says so)
            log.debug("metrics: cannot read Redis health: %s", exc)
            return
        if health.used_memory is not None:
            yield GaugeMetricFamily(*_USED, value=health.used_memory)
        if health.maxmemory is not None:
            yield GaugeMetricFamily(*_MAX, value=health.maxmemory)
        if health.policy_ok is not None:
            yield GaugeMetricFamily(*_POLICY_OK, value=1.0 if health.policy_ok else 0.0)


__all__ = ["RedisHealthCollector"]
