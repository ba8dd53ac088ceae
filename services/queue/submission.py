"""Submitting a job the one way the CLI and the Python client share: after ``checked_spec``
(services.spec.submittable), refuse an eval whose source can only fail at run time, then enqueue."""

from __future__ import annotations

from pathlib import Path

from services.artifacts import is_uri
from services.queue.job import AnySpec, JobRecord
from services.queue.jobqueue import JobQueue
from services.spec.errors import SpecError
from services.spec.jobspec import EvalSpec
from services.spec.types import JOB_ID_RE


def check_eval_source(queue: JobQueue, source: str) -> None:
    """Refuse an eval that can only fail at run time: the job must exist in Redis, a local path
    on disk. Remote URIs (``s3://`` ...) are left to the worker, which may see other storage."""
    if queue.get(source) is not None:
        return
    if JOB_ID_RE.match(source):
        raise SpecError(f"source: no job {source} in Redis (see `capsctl list`)", "source")
    if is_uri(source):
        return
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        raise SpecError(f"source: {source} is neither a job id nor an existing checkpoint path", "source")


def submit_job(queue: JobQueue, spec: AnySpec, idempotency_key: str | None = None) -> JobRecord:
    """Enqueue a spec that ``checked_spec`` passed; an eval whose source cannot exist is refused
    (``SpecError``) before anything is written."""
    if isinstance(spec, EvalSpec):
        check_eval_source(queue, spec.source.strip())
    return queue.submit(spec, idempotency_key=idempotency_key)
