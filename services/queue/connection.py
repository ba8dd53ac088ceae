"""Redis clients for a settings' URL: plain, TLS or through Sentinels, and text that round-trips
undecodable bytes."""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from services.config import Settings, is_sentinel_url, parse_sentinel_url

try:
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE
except ImportError:  # pragma: no cover - another redis-py layout: its own packer uses the encoder
    HiredisRespSerializer = None
else:
    if not HIREDIS_AVAILABLE:
        HiredisRespSerializer = None

if HiredisRespSerializer is not None:
    class _SurrogateEscapingPacker(HiredisRespSerializer):  # type: ignore[misc,valid-type]
        """hiredis's command packer, but text that came from undecodable bytes (surrogates) is
        sent as those bytes, as redis-py's own packer does with ``encoding_errors``."""

        def pack(self, *args: Any) -> list[bytes]:
            try:
                return super().pack(*args)
            except UnicodeEncodeError:
                return super().pack(*(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a
                                      for a in args))


def redis_client(settings: Settings | str, **kwargs: Any) -> redis.Redis:
    """A ``redis.Redis`` for the settings' URL (or a URL), with ``decode_responses=True`` and
    ``encoding_errors="surrogateescape"``.

    TLS (``rediss://``), passwords and ``?ssl_cert_reqs=...`` query options are handled by
    ``redis.Redis.from_url``; ``redis+sentinel://h1:p1,h2:p2/service[/db]`` asks the Sentinels for
    the primary (``sentinel_client``); extra keyword arguments are passed through.
    """
    url = settings if isinstance(settings, str) else settings.redis_url
    kwargs.setdefault("decode_responses", True)
    # Bytes that are not UTF-8 decode to surrogates instead of raising, and encode back to the
    # same bytes: junk in Redis never crashes a read, and an id read from an index still names
    # its key. services.queue.parsing.printable makes such text fit for output.
    kwargs.setdefault("encoding_errors", "surrogateescape")
    if HiredisRespSerializer is not None:  # hiredis packs commands itself, ignoring encoding_errors
        kwargs.setdefault("command_packer", _SurrogateEscapingPacker())
    kwargs.setdefault("health_check_interval", 30)
    if is_sentinel_url(url):
        return sentinel_client(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)



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
