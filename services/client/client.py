"""``Client``: what ``capsctl`` does, as Python calls for a notebook.

It takes the same fields as the job specs (plain dicts passed through the pydantic spec
models, so a field added to a spec works here unchanged), raises the CLI's one-line errors as
exceptions (``SpecError`` for a refused spec, ``JobNotFound``, ``JobStateError``, ``NoResults``,
``WaitTimeout``), and returns typed values: ``JobRecord``, ``JobEvent``, ``JobResult``,
``Comparison``. Every step is the shared function the CLI calls too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from services.config import Settings
from services.queue.errors import JobNotFound
from services.queue.job import JobRecord
from services.queue.jobqueue import JobQueue
from services.queue.submission import submit_job
from services.queue.watch import JobEvent, read_events, watch_job
from services.results import compare as compare_mod
from services.results.artifact_copy import download_job_artifacts
from services.results.job_results import job_result
from services.spec.results import JobResult
from services.spec.submittable import checked_spec
from services.stack.record import user_settings

# How many newest jobs ``list`` scans when it filters by kind or model (the index is by state only).
FILTER_SCAN_LIMIT = 10_000


class WaitTimeout(TimeoutError):
    """``Client.wait`` gave up: the job was not finished within the timeout."""


class Client:
    """The capsctl job queue from Python. ``redis_url`` and ``prefix`` default as the CLI's do:
    ``CAPSNET_REDIS_URL``/``CAPSNET_REDIS_PREFIX``, else the stack's ``<state_dir>/env``."""

    def __init__(self, redis_url: str | None = None, prefix: str | None = None,
                 settings: Settings | None = None) -> None:
        overrides = {k: v for k, v in (("redis_url", redis_url), ("redis_prefix", prefix)) if v is not None}
        self.settings = settings if settings is not None else user_settings(overrides)
        self.queue = JobQueue.from_settings(self.settings)

    # ------------------------------------------------------------------ submitting

    def submit(self, spec: Mapping[str, Any] | None = None, /, *, idempotency_key: str | None = None,
               **fields: Any) -> JobRecord:
        """Queue a job from a spec dict and/or keyword fields (a field given as a keyword wins);
        ``kind`` defaults to train. Returns the queued record; ``SpecError`` if refused."""
        merged = {"kind": "train", **dict(spec or {}), **fields}
        return submit_job(self.queue, checked_spec(merged, self.settings), idempotency_key)

    def tune(self, spec: Mapping[str, Any] | None = None, /, **fields: Any) -> JobRecord:
        """Queue a Ray Tune study (the fields of ``capsctl tune``: models, angles, lr, seeds, ...)."""
        return self.submit(spec, **{**fields, "kind": "tune"})

    def eval(self, source: str, /, **fields: Any) -> JobRecord:
        """Queue an evaluation of a job id's or a checkpoint path's model (angles, eval_suites, ...)."""
        return self.submit({"source": source}, **{**fields, "kind": "eval"})

    # ------------------------------------------------------------------ reading

    def get(self, job: str | JobRecord) -> JobRecord:
        """The job's current record; ``JobNotFound`` when there is no such job."""
        job_id = _job_id(job)
        record = self.queue.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id} (see `capsctl list`)")
        return record

    def list(self, state: str | None = None, kind: str | None = None, model: str | None = None,
             limit: int = 50) -> list[JobRecord]:
        """Newest first: the jobs in ``state`` (any when None), of ``kind`` and ``model`` if given."""
        if kind is None and model is None:
            return self.queue.list(state=state, limit=limit)
        records = self.queue.list(state=state, limit=FILTER_SCAN_LIMIT)
        wanted = [r for r in records if (kind is None or r.kind == kind) and (model is None or r.model == model)]
        return wanted[:limit]

    def follow(self, job: str | JobRecord, block_ms: int = 1000) -> Iterator[JobEvent]:
        """The job's events from its first, as they arrive, until it ends (state, progress, log, result)."""
        for event in watch_job(self.queue, _job_id(job), block_ms):
            yield JobEvent.of(event)

    def wait(self, job: str | JobRecord, timeout: float | None = None, poll_s: float = 0.5) -> JobRecord:
        """Block until the job is succeeded, failed or cancelled; returns that final record.
        ``WaitTimeout`` after ``timeout`` seconds (None: no limit)."""
        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            if record.is_terminal:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {record.state} after {timeout:g} s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def results(self, job: str | JobRecord) -> JobResult:
        """The typed result of a finished job (what ``capsctl results --json`` prints under
        ``result``); ``NoResults`` while it has none."""
        return job_result(self.get(job))

    # ------------------------------------------------------------------ acting on jobs

    def cancel(self, job: str | JobRecord) -> str:
        """``"cancelled"`` for a queued job, ``"cancel_requested"`` for a running one (its worker
        stops it); ``JobStateError`` for a finished job."""
        return self.queue.cancel(_job_id(job))

    def artifacts(self, job: str | JobRecord, out: str | Path,
                  what: tuple[str, ...] = ("checkpoint", "plots")) -> Path:
        """Download the job's files into ``<out>/<job id>`` (as ``capsctl artifacts``: from a local
        folder or ``s3://``...; ``what`` from checkpoint, plots, results, logs); returns that folder.
        ``FileNotFoundError`` when the store holds none of them."""
        record = self.get(job)
        target = Path(out).expanduser() / record.id
        events = (e for _, e in read_events(self.queue, record.id)) if "logs" in what else ()
        written = download_job_artifacts(record, self.settings.artifacts, target, what, events,
                                         require_checkpoint=False)
        if not written:
            raise FileNotFoundError(f"artifacts: no files for job {record.id} in {self.settings.artifacts}")
        return target

    def compare(self, jobs: Iterable[str | JobRecord], class_index: int | None = None) -> compare_mod.Comparison:
        """The table ``capsctl compare`` prints, as a ``Comparison`` (``.runs``, ``.angles``,
        ``.to_dict()``; ``services.results.compare.plot(comparison, path)`` draws it)."""
        records = [self.get(job) for job in dict.fromkeys(_job_id(j) for j in jobs)]
        return compare_mod.compare(records, self.queue.get, class_index)

    def close(self) -> None:
        self.queue.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _job_id(job: str | JobRecord) -> str:
    return job.id if isinstance(job, JobRecord) else str(job)
