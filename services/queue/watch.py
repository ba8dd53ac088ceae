"""Watching one job's event stream until it ends: what ``capsctl submit --follow``, ``logs -f``
and the Python client's ``follow``/``wait`` share."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from services.queue.errors import JobNotFound
from services.queue.job import JobRecord
from services.queue.jobqueue import JobQueue


def read_events(queue: JobQueue, job_id: str, after_id: str = "0",
                page: int = 1000) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every event of the job after ``after_id`` that is there now, oldest first, in pages."""
    cursor = after_id
    while True:
        batch = queue.events.read(job_id, cursor, count=page)
        for entry_id, event in batch:
            cursor = entry_id
            yield entry_id, event
        if len(batch) < page:
            return


def watch_job(queue: JobQueue, job_id: str, block_ms: int = 1000) -> Generator[dict[str, Any], None, JobRecord]:
    """Every event of the job (from the start, as ``{"id", "type", "at", "data"}``) until it is
    terminal, then the generator's return value is the final record. The record is re-read after
    every ``block_ms`` round of ``EventLog.follow`` (which also ends a round at the job's terminal
    state event), so a job whose events have expired, or whose terminal event was never written,
    still ends the watch. ``JobNotFound`` if the job vanishes."""
    cursor = "0"
    while True:
        for entry_id, event in queue.events.follow(job_id, cursor, block_ms=block_ms, timeout=block_ms / 1000):
            cursor = entry_id
            yield {"id": entry_id, **event}
        record = queue.get(job_id)
        if record is None:
            raise JobNotFound(f"job {job_id} disappeared from Redis while being followed")
        if record.is_terminal:
            for entry_id, event in read_events(queue, job_id, cursor):  # what came after the check
                yield {"id": entry_id, **event}
            return record


def follow_job(queue: JobQueue, job_id: str, handle: Callable[[dict[str, Any]], None],
               block_ms: int = 1000) -> JobRecord:
    """Call ``handle`` for each event of the job until it is terminal; returns the final record."""
    watch = watch_job(queue, job_id, block_ms)
    while True:
        try:
            handle(next(watch))
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream: ``type`` is state, progress, log or result; ``data``
    its JSON object (a progress event's ``data["type"]`` says step, epoch or eval)."""

    id: str
    type: str
    at: float
    data: dict[str, Any]

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> JobEvent:
        """From ``watch_job``'s ``{"id", "type", "at", "data"}``."""
        return cls(id=str(event["id"]), type=str(event["type"]), at=float(event["at"]), data=dict(event["data"]))
