"""Read-only views of the queue for metrics and ``capsctl``: job listings, counts per state and
priority, monotonic counters, dead letters, queue depth, what retention would remove.

Every read is total: a key of the wrong type (junk, or quarantined by claim) reads as empty or
0 rather than raising, so one bad key cannot blind a dashboard. ``JobQueue`` keeps the methods
callers use (``state_counts``, ``counters``, ...) and delegates here.
"""

from __future__ import annotations

from typing import Any

import redis

from services.queue import parsing
from services.queue.job import JobRecord
from services.queue.keys import Keys
from services.queue.registry import server_time
from services.queue.states import JobState
from services.spec.types import PRIORITIES

_s = parsing.text
_i = parsing.integer
_json = parsing.json_value


class QueueStats:
    """Counts and listings over one Redis database and key prefix (read-only)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def list(self, state: str | None = None, limit: int = 50) -> list[JobRecord]:
        """Newest first; all jobs or those in one state."""
        if state is not None and JobState.parse(state) is None:
            raise ValueError(f"state must be one of {', '.join(JobState)} (got {state!r})")
        if limit <= 0:
            return []
        ids = self._index_ids(state, limit)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        try:
            rows = pipe.execute(raise_on_error=False)  # a key that is not a hash: its error, skipped
        except UnicodeDecodeError:  # a strictly decoding client met junk: fetch one by one
            rows = []
            for job_id in ids:
                try:
                    rows.append(self.client.hgetall(self.keys.job(job_id)))
                except (UnicodeDecodeError, redis.ResponseError):
                    rows.append(None)
        out = []
        for job_id, h in zip(ids, rows, strict=True):
            if isinstance(h, dict) and h:  # an index entry without a record has nothing to show
                record = JobRecord.from_hash(h)
                record.id = record.id or job_id
                out.append(record)
        return out

    def _index_ids(self, state: str | None, limit: int) -> list[str]:
        """Job ids of the ``jobs`` index (or of one state's indexes), newest first. An index key
        of the wrong type reads as empty."""
        if state is None:
            try:
                return [_s(x) for x in self.client.zrevrange(self.keys.jobs, 0, limit - 1)]  # type: ignore[misc]
            except redis.ResponseError as err:
                if not parsing.wrong_type(err):
                    raise
                return []
        pipe = self.client.pipeline(transaction=False)
        for p in PRIORITIES:
            pipe.zrevrange(self.keys.state(state, p), 0, limit - 1, withscores=True)
        scored = [(float(score), _s(m)) for rows in pipe.execute(raise_on_error=False)
                  if isinstance(rows, list) for m, score in rows]
        return [m for _, m in sorted(scored, key=lambda t: (-t[0], t[1]))[:limit]]  # type: ignore[misc]

    def state_counts(self) -> dict[tuple[str, str], int]:
        """``{(state, priority): n}`` for every state and priority: one pipelined round of ZCARDs."""
        pipe = self.client.pipeline(transaction=False)
        pairs = [(s, p) for s in JobState for p in PRIORITIES]
        for s, p in pairs:
            pipe.zcard(self.keys.state(s, p))
        # An index key of the wrong type counts 0 (its error is not raised).
        return {pair: (n if isinstance(n, int) else 0)
                for pair, n in zip(pairs, pipe.execute(raise_on_error=False), strict=True)}

    def counters(self) -> dict[str, Any]:
        """Monotonic counters for metrics::

            {"submitted": {(kind, model): n}, "finished": {(kind, model, outcome): n},
             "retries": n, "lease_expiries": n, "dead_lettered": n, "manual_retries": n, "pruned": n,
             "infrastructure_losses": n}
        """
        try:
            stored = self.client.hgetall(self.keys.counters)
        except redis.ResponseError as err:  # not a hash: no counters to read
            if not parsing.wrong_type(err):
                raise
            stored = {}
        # Names become metric labels: printable text only.
        raw = {parsing.printable(k): _i(v) for k, v in stored.items()}
        out: dict[str, Any] = {"submitted": {}, "finished": {}, "retries": 0, "lease_expiries": 0,
                               "dead_lettered": 0, "manual_retries": 0, "pruned": 0, "infrastructure_losses": 0}
        for name, value in raw.items():
            parts = name.split(":")
            if parts[0] == "submitted" and len(parts) == 3:
                out["submitted"][(parts[1], parts[2])] = value
            elif parts[0] == "finished" and len(parts) == 4:
                out["finished"][(parts[1], parts[2], parts[3])] = value
            elif len(parts) == 1 and parts[0] and parts[0] not in ("submitted", "finished"):
                out[parts[0]] = value
        return out

    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first: ``{"job_id", "reason", "at", "source"}`` (source = queue key or "claim")."""
        try:
            rows = self.client.lrange(self.keys.dead_letters, 0, max(0, limit - 1)) if limit > 0 else []
        except redis.ResponseError as err:  # not a list: nothing readable
            if not parsing.wrong_type(err):
                raise
            rows = []
        out = []
        for row in rows:
            entry = _json(row, None)
            out.append(entry if isinstance(entry, dict) else {"raw": _s(row)})
        return out

    def dead_letter_count(self) -> int:
        """How many dead letters are kept (0 when the key is not a list)."""
        try:
            return int(self.client.llen(self.keys.dead_letters))
        except redis.ResponseError as err:
            if not parsing.wrong_type(err):
                raise
            return 0

    def queue_depth(self) -> dict[str, int]:
        """Entries waiting in the queue zsets per priority (junk included until claim meets it)."""
        out = {}
        for p in PRIORITIES:
            try:
                shapes = [_s(s) for s in self.client.smembers(self.keys.shapes(p))]
            except redis.ResponseError as err:  # not a set (claim quarantines it)
                if not parsing.wrong_type(err):
                    raise
                shapes = []
            pipe = self.client.pipeline(transaction=False)
            for shape in shapes:
                g, _, c = (shape or "").partition(":")
                pipe.zcard(self.keys.queue(p, g, c))
            out[p] = sum(int(n) for n in pipe.execute(raise_on_error=False) if isinstance(n, int))
        return out

    def count_prunable(self, older_than: float, now: float | None = None) -> int:
        """How many finished jobs ``prune(older_than)`` would remove (index entries, one round)."""
        cutoff = (server_time(self.client) if now is None else float(now)) - float(older_than)
        pipe = self.client.pipeline(transaction=False)
        for state in JobState.terminal():
            for p in PRIORITIES:
                pipe.zcount(self.keys.state(state, p), "-inf", repr(cutoff))
        return sum(n for n in pipe.execute(raise_on_error=False) if isinstance(n, int))


__all__ = ["QueueStats"]
