"""A finished job's typed result, or the one-line reason there is none yet: what ``capsctl
results`` and the Python client's ``results`` both return."""

from __future__ import annotations

from services.queue.job import JobRecord
from services.spec.results import JobResult


class NoResults(LookupError):
    """The job has not stored a result (still queued or running, failed, or cancelled)."""


def job_result(record: JobRecord) -> JobResult:
    """The typed result of ``record``; ``NoResults`` (one line) when it has none."""
    result = JobResult.read(record.result)
    if result is None:
        raise NoResults(f"job {record.id} has no results yet (state {record.state})"
                        + (f": {record.error}" if record.error else ""))
    return result
