"""Why an attempt of a job ended without a result: one typed cause per failed, lost or
cancelled attempt (in the spirit of Ray's ``JobErrorType``).

Stored as its string in the job hash (``cause``) and in the attempt's transition, and the
``cause`` label of ``capsnet_job_failures_total``, so the set must stay small and fixed."""

from __future__ import annotations

from enum import StrEnum


class FailureCause(StrEnum):
    USER_ERROR = "user_error"  # the job's input is refused (a bad spec, a source that cannot be used)
    INFRASTRUCTURE_LOSS = "infrastructure_loss"  # a Ray node, rank process or the worker's lease went
    BAD_CHECKPOINT = "bad_checkpoint"  # the checkpoint to resume from could not be read
    STORAGE = "storage"  # the artifact store is full, read-only or gone
    CANCELLED = "cancelled"  # a user cancelled the job
    TIME_LIMIT = "time_limit"  # the job ran past its --time-limit
    REDIS = "redis"  # Redis answered with an error the attempt could not get past
    UNKNOWN = "unknown"  # any other exception raised by the run

    @classmethod
    def parse(cls, value: object) -> FailureCause | None:
        """The cause named by ``value``, or None for anything else (absent, or junk in Redis)."""
        try:
            return cls(value)
        except ValueError:
            return None


__all__ = ["FailureCause"]
