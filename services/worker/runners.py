"""Which function runs a job of each kind: one table, one signature, instead of a chain of ifs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.queue.jobqueue import JobQueue
from services.runs.evaluate import run_eval_job
from services.runs.runtime import JobContext
from services.runs.train import run_train_job

# Every runner takes the claimed job's spec, its context and the queue, and returns the job's
# result document; it raises to fail the attempt.
Runner = Callable[[Any, JobContext, JobQueue], dict[str, Any]]


def _train(spec: Any, ctx: JobContext, queue: JobQueue) -> dict[str, Any]:
    return run_train_job(spec, ctx)


def _eval(spec: Any, ctx: JobContext, queue: JobQueue) -> dict[str, Any]:
    return run_eval_job(spec, ctx, queue)


def _tune(spec: Any, ctx: JobContext, queue: JobQueue) -> dict[str, Any]:
    from services.runs.tune import run_tune_job  # Ray Tune is heavy: import it only for tune jobs

    return run_tune_job(spec, ctx, queue)


RUNNERS: dict[str, Runner] = {"train": _train, "eval": _eval, "tune": _tune}


def runner_for(kind: str) -> Runner:
    """The runner of ``kind``; claim validated the spec, so an unknown kind is a programming error."""
    try:
        return RUNNERS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}") from None


__all__ = ["RUNNERS", "Runner", "runner_for"]
