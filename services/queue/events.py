"""Per-job event streams: what ``capsctl logs -f`` and ``submit --follow`` read.

Each job has one Redis stream (``Keys.events(job_id)``), capped with ``XADD MAXLEN ~ N``.
An entry has three fields::

    type  state | progress | log | result
    at    seconds since the epoch (Redis server time for entries written by the queue)
    data  JSON object, e.g.
          state     {"state": "running", "attempt": 1, "worker": "w1", ...}
          progress  {"epoch": 2, "step": 300, "loss": 0.12, "accuracy": 0.97, "images_per_second": 5400}
          log       {"level": "info", "message": "..."}
          result    the job's result object

The queue's Lua scripts write ``state`` (and ``progress``/``result``) entries with the same
three fields inside the transition itself, so a state change and its event are atomic.
``read`` returns ``[(entry_id, {"type": ..., "at": float, "data": {...}})]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import redis

from services.queue import parsing
from services.queue.keys import Keys
from services.queue.scripts import Scripts
from services.queue.states import JobState

EVENT_TYPES = ("state", "progress", "log", "result")
DEFAULT_MAXLEN = 5000

Event = tuple[str, dict[str, Any]]

_NOT_JSON = object()


def decode_entry(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A stream entry's fields -> ``{"type": str, "at": float, "data": dict}``; total, for any
    entry Redis may hold: data that is not a JSON object is kept as ``{"raw": <it>}`` (text
    that is not JSON as that text), an ``at`` that is not a finite time reads as 0.0."""
    fields = {parsing.text(k): v for k, v in fields.items()}
    raw = parsing.text(fields.get("data"))
    data = parsing.json_value(raw, _NOT_JSON) if raw is not None else {}
    if data is _NOT_JSON:
        data = {"raw": raw}
    elif not isinstance(data, dict):
        data = {"raw": data}
    at = parsing.finite(fields.get("at"))
    return {"type": parsing.text(fields.get("type")) or "log", "at": at if at is not None else 0.0, "data": data}


class EventLog:
    """Publish and read per-job event streams."""

    def __init__(self, client: redis.Redis, keys: Keys, maxlen: int = DEFAULT_MAXLEN,
                 scripts: Scripts | None = None) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self.client = client
        self.keys = keys
        self.maxlen = maxlen
        # The fenced append is queue.lua's `event_append`, under the queue's one fencing rule.
        self._scripts = scripts if scripts is not None else Scripts(client, keys, events_maxlen=maxlen)

    def publish(self, job_id: str, type: str, data: dict[str, Any] | None = None, *,
                lease_token: str | None = None) -> str | None:
        """Append one event; returns its stream id. ``data`` must be JSON-serialisable.

        With a ``lease_token`` (the caller acts for one attempt of the job) the append is fenced:
        it happens only while the job is running under that token, atomically, and None is
        returned otherwise, so an attempt that lost its lease never mixes into the stream of
        the attempt that replaced it."""
        if type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {', '.join(EVENT_TYPES)} (got {type!r})")
        payload = json.dumps(data if data is not None else {}, separators=(",", ":"), allow_nan=False)
        at = f"{time.time():.6f}"
        if lease_token is not None:
            entry_id = self._scripts.run("event_append", [job_id, lease_token, type, payload], now=float(at))
            if entry_id is None:
                return None
        else:
            entry_id = self.client.xadd(self.keys.events(job_id), {"type": type, "at": at, "data": payload},
                                        maxlen=self.maxlen, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def log(self, job_id: str, message: str, level: str = "info", *, lease_token: str | None = None,
            **extra: Any) -> str | None:
        """Append a ``log`` event (fenced by ``lease_token`` when given, see ``publish``)."""
        return self.publish(job_id, "log", {"level": level, "message": message, **extra}, lease_token=lease_token)

    def read(self, job_id: str, after_id: str = "0", block_ms: int | None = None,
             count: int = 1000) -> list[Event]:
        """Events after ``after_id`` (exclusive), oldest first, at most ``count``.

        ``after_id="0"`` reads from the beginning, ``"$"`` only what arrives from now on (with
        ``block_ms``). With ``block_ms`` it waits up to that long for the first new entry
        (``XREAD BLOCK``); without, it returns at once (``XRANGE``).
        """
        key = self.keys.events(job_id)
        try:
            rows = self._rows(key, after_id, block_ms, count)
        except redis.ResponseError as err:
            if not parsing.wrong_type(err):
                raise
            # The key is not a stream: no events to read. Wait as a blocking read would, so a
            # follower polls at its usual pace instead of spinning.
            if block_ms is not None:
                time.sleep(block_ms / 1000)
            return []
        return [((eid.decode() if isinstance(eid, bytes) else eid), decode_entry(fields)) for eid, fields in rows]

    def _rows(self, key: str, after_id: str, block_ms: int | None, count: int) -> list[Any]:
        if block_ms is None:
            if after_id == "$":
                return []
            start = "-" if after_id in ("0", "0-0", "-") else f"({after_id}"
            rows = self.client.xrange(key, min=start, max="+", count=count)
        else:
            result = self.client.xread({key: after_id}, count=count, block=max(int(block_ms), 1))
            if not result:
                rows = []
            elif isinstance(result, dict):  # RESP3: {key: [entries]}
                rows = next(iter(result.values()))
                if rows and isinstance(rows[0], list) and rows[0] and isinstance(rows[0][0], list | tuple):
                    rows = rows[0]
            else:  # RESP2: [[key, entries]]
                rows = result[0][1]
        return rows

    def last_id(self, job_id: str) -> str:
        """The id of the newest entry ("0" when there is none): ``read(after_id=last_id)`` tails."""
        try:
            rows = self.client.xrevrange(self.keys.events(job_id), count=1)
        except redis.ResponseError as err:
            if not parsing.wrong_type(err):
                raise
            return "0"
        if not rows:
            return "0"
        return rows[0][0].decode() if isinstance(rows[0][0], bytes) else rows[0][0]

    def follow(self, job_id: str, after_id: str = "0", block_ms: int = 1000,
               until_terminal: bool = True, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they arrive; stop after a terminal ``state`` event (succeeded, failed,
        cancelled) that is the newest entry when ``until_terminal``, or after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = after_id
        while True:
            wait = block_ms
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = max(1, min(block_ms, int(left * 1000)))
            batch = self.read(job_id, cursor, block_ms=wait)
            for i, (entry_id, event) in enumerate(batch):
                cursor = entry_id
                yield entry_id, event
                # A terminal state ends the stream unless more events follow it (manual retry).
                if (until_terminal and i == len(batch) - 1 and event["type"] == "state"
                        and _is_terminal(event["data"].get("state"))):
                    return

    def length(self, job_id: str) -> int:
        return int(self.client.xlen(self.keys.events(job_id)))

    def delete(self, job_id: str) -> None:
        self.client.delete(self.keys.events(job_id))


def _is_terminal(value: object) -> bool:
    state = JobState.parse(value)
    return state is not None and state.is_terminal


__all__ = ["DEFAULT_MAXLEN", "EVENT_TYPES", "Event", "EventLog", "decode_entry"]
