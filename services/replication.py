"""Redis high availability: ``redis+sentinel://`` URLs, and waiting for replicas before an
acknowledgement (``WAIT``). Guarantees and limits: docs/architecture.md, README "Deployment"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_URL_FORM = "redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]"


class SentinelUrlError(ValueError):
    """A redis+sentinel:// URL that cannot be used; the message is one line."""


class NotReplicated(redis.exceptions.RedisError):
    """The primary took the write but fewer than the required replicas confirmed it within the
    timeout. The write stands on the primary; a failover now could lose it. Transient: the
    caller retries (outcome scripts replay idempotently under their lease token)."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int, reply: Any = None) -> None:
        super().__init__(f"not yet replicated: {acked} of {wanted} replica(s) confirmed within {timeout_ms} ms")
        self.acked, self.wanted, self.reply = acked, wanted, reply


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:password@]h1:p1,h2:p2/service[/db][?sentinel_password=...]``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise SentinelUrlError(f"not a sentinel URL: {url!r}; expected {SENTINEL_URL_FORM}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels = []
    for item in filter(None, hostlist.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SentinelUrlError(f"sentinel address {item!r} is not host:port; expected {SENTINEL_URL_FORM}")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise SentinelUrlError(f"no sentinel addresses in the URL; expected {SENTINEL_URL_FORM}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise SentinelUrlError(f"the URL must name the monitored service (and optionally a db): {SENTINEL_URL_FORM}")
    if len(path) == 2 and not path[1].isdigit():
        raise SentinelUrlError(f"db {path[1]!r} is not a number; expected {SENTINEL_URL_FORM}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SentinelUrl(sentinels, unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       unquote(username) or None, unquote(password) or None,
                       query.pop("sentinel_password", None), query)


def sentinel_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client for the primary the sentinels name; it asks them again after a failover (a
    connection error or READONLY reply drops the connection, the next command finds the new primary)."""
    spec = parse_sentinel_url(url)
    timeout = float(spec.options.get("socket_timeout", 5.0))
    sentinel = Sentinel(spec.sentinels, socket_timeout=timeout,
                        sentinel_kwargs={"password": spec.sentinel_password, "socket_timeout": timeout})
    kwargs.setdefault("socket_timeout", timeout)
    return sentinel.master_for(spec.service_name, db=spec.db, username=spec.username, password=spec.password,
                               **kwargs)


def run_replicated(client: redis.Redis, replicas: int, timeout_ms: int, queue_write: Any) -> Any:
    """Run the write ``queue_write(pipe)`` puts on a pipeline, then ``WAIT replicas timeout_ms`` on the
    same connection; its reply, or ``NotReplicated`` (carrying the reply) when too few replicas confirmed."""
    pipe = client.pipeline(transaction=False)
    queue_write(pipe)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    *replies, acked = pipe.execute(raise_on_error=False)
    for failed in replies:
        if isinstance(failed, Exception):
            raise failed  # the write's own error (READONLY during a failover, a script's error...)
    if isinstance(acked, Exception):
        if "replica" in str(acked).lower():
            # This connection reached a replica (a failover under way): ask the Sentinels again.
            client.connection_pool.disconnect()
            raise redis.exceptions.ReadOnlyError(f"READONLY {acked}")
        raise acked
    reply = replies[0] if len(replies) == 1 else replies
    if int(acked) < replicas:
        raise NotReplicated(int(acked), replicas, timeout_ms, reply)
    return reply
