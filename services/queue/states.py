"""The states a job moves through, in one place.

``JobState`` is a ``StrEnum``: its members are the very strings stored in the job hash, the
state indexes' key names and the Lua scripts (services/queue/queue.lua), so Redis data written
before it existed reads back unchanged."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """No attempt follows unless someone retries the job by hand."""
        return self in _TERMINAL

    @classmethod
    def terminal(cls) -> tuple[JobState, ...]:
        return tuple(s for s in cls if s.is_terminal)

    @classmethod
    def parse(cls, value: object) -> JobState | None:
        """The state named by ``value``, or None for anything else (junk read from Redis)."""
        try:
            return cls(value)
        except ValueError:
            return None


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

__all__ = ["JobState"]
