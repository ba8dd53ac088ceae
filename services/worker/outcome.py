"""How one attempt of a job ended, as ``Worker.execute`` reports it.

A ``StrEnum``: the value is also the ``outcome`` label of the run-duration metric, so the label
values stay the strings they were."""

from __future__ import annotations

from enum import StrEnum


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"  # result recorded under this attempt's token
    FAILED = "failed"  # error recorded; the queue decides whether it is retried
    CANCELLED = "cancelled"  # a cancel was requested and recorded
    LOST = "lost"  # the attempt's infrastructure or lease is gone; another attempt may follow


__all__ = ["AttemptOutcome"]
