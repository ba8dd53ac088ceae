"""Riding out Redis outages: which errors are transient, and how long to wait before trying again.

A worker runs for weeks; the Redis it talks to restarts, fails over, loads a big AOF or runs a
slow script now and then. None of that may kill the worker or lose a job's outcome, so every
Redis call of the worker side goes through one :class:`RedisRetry`:

* ``call(fn, ...)`` retries ``fn`` until it answers, backing off (capped exponential with
  jitter, 0.1 s to 10 s), for what must get through: a claim, a job's outcome, a heartbeat.
* ``attempt(fn, ...)`` tries once and returns ``default`` on a transient error, and while Redis
  is known to be down it does not even try until the next back-off probe is due: for what may
  be dropped (progress events, cancel checks) inside a training loop that must not stall.

Transient = the connection failed or timed out, or the server said ``LOADING`` (replaying its
AOF), ``READONLY`` (we reached a replica during a failover), ``BUSY`` (a script runs too long),
``MASTERDOWN``, ``TRYAGAIN`` or ``OOM`` (``maxmemory`` reached under ``noeviction``: writes are
refused until memory is raised or freed; nothing was written, so trying again later is safe,
and a script is refused before its first write, so none half-applies). Wrong credentials and
every other reply error are not: retrying cannot fix them. redis-py reconnects by itself on the
next command after a dropped connection.

One outage logs one line when it starts and one when Redis answers again, per ``RedisRetry``
(one per process is the intent), however many threads and calls meet it. Out of memory is its
own episode: Redis still answers reads then, so a read that succeeds does not end it; it ends
(one line each way) when a call that was refused for memory goes through. ``attempt`` does not
skip calls while Redis is out of memory (an OOM reply is immediate, unlike a dead connection).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.queue.replication import NotReplicated

T = TypeVar("T")

# Reply codes redis-py leaves in a plain ResponseError's message (it maps LOADING, READONLY,
# MASTERDOWN and TRYAGAIN to classes of their own, checked below).
TRANSIENT_REPLY_CODES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "OOM")
_TRANSIENT_REPLY_CLASSES = (redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
                            redis.exceptions.MasterDownError, redis.exceptions.OutOfMemoryError,
                            NotReplicated)  # the write stands; recorded again until replicas have it

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 10.0

default_log = logging.getLogger("capsctl.redis")


class RedisUnavailable(redis.ConnectionError):
    """Redis did not answer before the caller gave up (stop requested or deadline passed)."""


def is_transient(exc: BaseException) -> bool:
    """True for the errors an outage, restart or failover produces; False for everything a retry
    cannot fix (wrong password, missing permission, a script's own error, a WRONGTYPE key)."""
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError | RedisUnavailable):
        return False
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # BusyLoadingError (LOADING) included
        return True
    if isinstance(exc, _TRANSIENT_REPLY_CLASSES):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).split(" ", 1)[0].upper() in TRANSIENT_REPLY_CODES
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """True for Redis' ``OOM command not allowed when used memory > 'maxmemory'`` reply (also when
    a script's write met it)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).split(" ", 1)[0].upper() == "OOM"


def describe(exc: BaseException) -> str:
    """``ErrorClass: first line of the message``: short enough for one log line."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def no_retry_client_kwargs() -> dict[str, Any]:
    """redis-py client options for code that backs off by itself: fail fast (no built-in retry
    loop of its own) and never hang on a peer that stopped answering."""
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 5, "socket_timeout": 30}


@dataclass
class Backoff:
    """Capped exponential back-off with jitter: the n-th delay is uniform in [d/2, d] with
    ``d = min(cap, base * 2**n)``, so many workers coming back at once do not stampede."""

    base: float = BACKOFF_BASE_S
    cap: float = BACKOFF_CAP_S
    failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class RedisRetry:
    """The process's view of Redis health: retry helpers plus one log line per outage."""

    def __init__(self, log: logging.Logger | None = None, base: float = BACKOFF_BASE_S,
                 cap: float = BACKOFF_CAP_S) -> None:
        self.log = log or default_log
        self.base = base
        self.cap = cap
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._probe = Backoff(base, cap)  # attempt()'s schedule while Redis is down
        self._next_probe = 0.0
        self._oom_since: float | None = None
        self._oom_refused: set[str] = set()  # the ``what`` of calls refused in this OOM episode

    @property
    def out_of_memory(self) -> bool:
        """Whether Redis refused a write for memory and no refused call went through since."""
        return self._oom_since is not None

    @property
    def down(self) -> bool:
        """Whether the last call that reached for Redis failed with a transient error."""
        return self._down_since is not None

    def _failed(self, exc: BaseException, what: str) -> None:
        if is_out_of_memory(exc):
            self._out_of_memory(exc, what)
            return
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.log.warning("Redis unavailable (%s) while %s: backing off %.1f-%.0f s between tries",
                                 describe(exc), what, self.base, self.cap)

    def _out_of_memory(self, exc: BaseException, what: str) -> None:
        with self._lock:
            self._oom_refused.add(what)
            if self._oom_since is None:
                self._oom_since = time.monotonic()
                self.log.warning("Redis is out of memory (%s) while %s: writes wait and retry (backing off "
                                 "%.1f-%.0f s), progress and log events are dropped; raise maxmemory or free "
                                 "memory in Redis", describe(exc), what, self.base, self.cap)

    def _succeeded(self, what: str) -> None:
        if self._oom_since is not None and what in self._oom_refused:
            with self._lock:
                if self._oom_since is not None:
                    self.log.warning("Redis accepts writes again after %.1f s out of memory (%s)",
                                     time.monotonic() - self._oom_since, what)
                    self._oom_since = None
                    self._oom_refused.clear()
        if self._down_since is None:  # the common case: no lock, no log
            return
        with self._lock:
            if self._down_since is not None:
                self.log.warning("Redis answers again after %.1f s (%s)", time.monotonic() - self._down_since,
                                 what)
                self._down_since = None
                self._probe.reset()
                self._next_probe = 0.0

    def call(self, fn: Callable[..., T], *args: Any, what: str, stop: threading.Event | None = None,
             timeout: float | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried with back-off while the error is transient.

        Raises :class:`RedisUnavailable` once ``stop`` is set or ``timeout`` seconds have passed
        without an answer, and any non-transient error at once."""
        backoff = Backoff(self.base, self.cap)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            answered, result, exc = self._once(fn, args, kwargs, what)
            if answered:
                return result
            # A transient failure, recorded by _once: back off, then try again.
            delay = backoff.next_delay()
            if deadline is not None:
                delay = min(delay, deadline - time.monotonic())
                if delay <= 0:
                    raise RedisUnavailable(f"Redis unavailable while {what}: {describe(exc)}") from exc
            if stop is not None:
                if stop.wait(delay):
                    raise RedisUnavailable(f"gave up {what}: stop requested while Redis was "
                                           f"unavailable ({describe(exc)})") from exc
            else:
                time.sleep(delay)

    def attempt(self, fn: Callable[..., T], *args: Any, what: str, default: Any = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` once; ``default`` on a transient error or, without calling
        ``fn``, while Redis is down and the next probe is not due yet. Never blocks on back-off."""
        if self._down_since is not None and time.monotonic() < self._next_probe:
            return default
        answered, result, exc = self._once(fn, args, kwargs, what)
        if not answered and not is_out_of_memory(exc):
            with self._lock:
                self._next_probe = time.monotonic() + self._probe.next_delay()
            return default
        return default if not answered else result

    def _once(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
              what: str) -> tuple[bool, T | None, Exception | None]:
        """One call: ``(True, result, None)``, or ``(False, None, error)`` after a transient error
        (recorded); any other error propagates."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._failed(exc, what)
            return False, None, exc
        self._succeeded(what)
        return True, result, None


__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "TRANSIENT_REPLY_CODES", "Backoff", "RedisRetry", "RedisUnavailable",
           "describe", "is_out_of_memory", "is_transient", "no_retry_client_kwargs"]
