"""What the queue raises (one-line messages, for ``capsctl`` to print) and how much of a
failed attempt's text it keeps."""

from __future__ import annotations

# A job's hash is read whole by claim (HGETALL); one 32 MB field there blocked all of Redis for
# seconds, so a failure's error and traceback are cut to these before they are stored.
MAX_ERROR_CHARS = 2 * 1024
MAX_TRACEBACK_CHARS = 16 * 1024


class QueueError(Exception):
    """Base class of queue errors (one-line messages)."""


class JobNotFound(QueueError, LookupError):
    pass


class JobStateError(QueueError, ValueError):
    """The job is in a state where the operation makes no sense (e.g. cancel a finished job)."""


class CapacityError(QueueError, ValueError):
    """No live worker could ever run the job (e.g. it needs more GPUs than any worker has)."""


class IdempotencyConflict(QueueError, ValueError):
    """An idempotency key already names a job with a different spec (as payment APIs refuse a
    reused key with a different request); ``job_id`` is that job."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


def truncate_head(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``: its head, marked when something was cut."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 40)  # room for the marker
    return text[:keep] + f" ... [{len(text) - keep} characters cut]"


def truncate_tail(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``: its tail (a traceback's end says what raised)."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 40)
    return f"[{len(text) - keep} characters cut] ...\n" + text[len(text) - keep:]


__all__ = ["MAX_ERROR_CHARS", "MAX_TRACEBACK_CHARS", "CapacityError", "IdempotencyConflict", "JobNotFound",
           "JobStateError", "QueueError", "truncate_head", "truncate_tail"]
