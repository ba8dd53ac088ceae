"""Picking jobs out of the queue: a job id from a unique prefix, and the jobs that match a filter
(tags, name glob, model, kind, state, age), newest first.

Both read the ``jobs`` index (a zset of every job id, scored by submit time): prefixes by ZSCAN
with a MATCH pattern, filters by walking the index newest first and reading records in
pipelined batches, so ~10k jobs cost a few dozen round trips, never one per job.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import redis

from services.queue import parsing
from services.queue.errors import JobNotFound, QueueError
from services.queue.job import JobRecord
from services.queue.keys import Keys

BATCH = 500  # records per pipelined round: large enough to be few rounds, small enough to stay ms
SHOWN_AMBIGUOUS = 3  # ids an "ambiguous" error names before "..."


class AmbiguousJobId(QueueError):
    """A prefix that starts more than one job id."""


@dataclass(frozen=True)
class JobFilter:
    """What ``capsctl list`` (and bulk cancel/retry) select on; every given part must match."""

    tags: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None  # a glob (fnmatch), matched against the whole name
    model: str | None = None  # one model of the job (a tune job's label is "capsnet+lenet5")
    kind: str | None = None
    state: str | None = None
    since: float | None = None  # submitted at or after this time (seconds since the epoch)

    @property
    def is_empty(self) -> bool:
        return not (self.tags or self.name or self.model or self.kind or self.state or self.since is not None)

    def matches(self, record: JobRecord) -> bool:
        if self.state is not None and record.state != self.state:
            return False
        if self.kind is not None and record.kind != self.kind:
            return False
        if self.model is not None and self.model not in (record.model or "").split("+"):
            return False
        if self.name is not None and not fnmatch.fnmatchcase(record.name or "", self.name):
            return False
        tags = record_tags(record)
        return all(tags.get(k) == v for k, v in self.tags.items())


def record_tags(record: JobRecord) -> dict[str, str]:
    """The job's tags as its stored spec holds them (``{}`` for jobs from before tags, or junk)."""
    raw = record.spec.get("tags")
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items()}


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def resolve_job_id(client: redis.Redis, keys: Keys, text: str) -> str:
    """The job id that ``text`` names: itself when a job has that id, else the one job whose id
    starts with it. Raises JobNotFound (no match) or AmbiguousJobId (several)."""
    if not text:
        raise JobNotFound("no job ''")
    if client.exists(keys.job(text)):
        return text
    matches: list[str] = []
    try:
        for member in client.zscan_iter(keys.jobs, match=_glob_escape(text) + "*", count=1000):
            job_id = parsing.text(member[0] if isinstance(member, tuple) else member)
            if job_id:
                matches.append(job_id)
    except redis.ResponseError as err:  # an index of the wrong type: nothing to match
        if not parsing.wrong_type(err):
            raise
    if not matches:
        raise JobNotFound(f"no job {text}")
    if len(matches) > 1:
        matches.sort()
        shown = ", ".join(matches[:SHOWN_AMBIGUOUS]) + (", ..." if len(matches) > SHOWN_AMBIGUOUS else "")
        raise AmbiguousJobId(f"ambiguous: {len(matches)} jobs start with {text} ({shown})")
    return matches[0]


def _index_batches(client: redis.Redis, keys: Keys, since: float | None) -> Iterator[list[str]]:
    """Job ids of the ``jobs`` index, newest first, BATCH at a time (only those submitted at or
    after ``since`` when given: the score is the submit time)."""
    low = "-inf" if since is None else repr(float(since))
    offset = 0
    while True:
        try:
            rows = client.zrevrangebyscore(keys.jobs, "+inf", low, start=offset, num=BATCH)
        except redis.ResponseError as err:
            if not parsing.wrong_type(err):
                raise
            return
        ids = [i for i in (parsing.text(r) for r in rows) if i]
        if ids:
            yield ids
        if len(rows) < BATCH:
            return
        offset += BATCH


def select_jobs(client: redis.Redis, keys: Keys, job_filter: JobFilter, limit: int | None = None) -> list[JobRecord]:
    """The jobs that match ``job_filter``, newest first, at most ``limit`` (None: all)."""
    out: list[JobRecord] = []
    for ids in _index_batches(client, keys, job_filter.since):
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        try:
            rows = pipe.execute(raise_on_error=False)  # a key that is not a hash: its error, skipped
        except UnicodeDecodeError:  # a strictly decoding client met junk: skip this batch's junk one by one
            rows = []
            for job_id in ids:
                try:
                    rows.append(client.hgetall(keys.job(job_id)))
                except (UnicodeDecodeError, redis.ResponseError):
                    rows.append(None)
        for job_id, h in zip(ids, rows, strict=True):
            if not (isinstance(h, dict) and h):
                continue
            record = JobRecord.from_hash(h)
            record.id = record.id or job_id
            if job_filter.matches(record):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    return out
    return out


__all__ = ["AmbiguousJobId", "JobFilter", "record_tags", "resolve_job_id", "select_jobs"]
