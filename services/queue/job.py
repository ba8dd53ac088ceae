"""A job as the queue stores it (``JobRecord``, one Redis hash per job) and as ``claim`` hands
it to a worker (``ClaimedJob``); the queue's operations are in ``services.queue.jobqueue``."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from services.queue import parsing
from services.queue.states import JobState
from services.spec.gpus import gpu_amount
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec

AnySpec = TrainSpec | EvalSpec | TuneSpec

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"

# Every value read from Redis goes through these total parsers (services.queue.parsing): junk
# becomes None or a default, never an exception.
_s = parsing.text
_f = parsing.finite
_i = parsing.integer


def _gpus(value: Any) -> int | float:
    """A stored GPU amount: whole GPUs as an int, a fraction as a float; junk reads as 0."""
    x = parsing.finite(value)
    return 0 if x is None else gpu_amount(x)
_json = parsing.json_value


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def new_job_id() -> str:
    """``j-<ms since epoch, base36>-<8 random base32 chars>``: short, unique (40 random bits per
    millisecond), sorts by creation time."""
    rand = base64.b32encode(secrets.token_bytes(5)).decode().lower()
    return f"j-{_base36(int(time.time() * 1000))}-{rand}"


_UNREADABLE = object()


def _checkpoints(parsed: Any) -> list[dict[str, Any]]:
    return [c for c in parsed if isinstance(c, dict)] if isinstance(parsed, list) else []


def _transitions(raw: Any) -> list[dict[str, Any]]:
    """The stored ``transitions`` JSON list; whatever is not a JSON object (or a list of them)
    is kept as ``{"invalid": <what was there>}`` so readers can show that it is unreadable."""
    if raw is None or raw == "":
        return []
    parsed = _json(raw, _UNREADABLE)
    if parsed is _UNREADABLE:
        return [{"invalid": parsing.printable(raw)[:200]}]
    if not isinstance(parsed, list):
        return [{"invalid": parsed}]
    return [t if isinstance(t, dict) else {"invalid": t} for t in parsed]


@dataclass
class JobRecord:
    """A job as stored in its Redis hash (``Keys.job(id)``), with typed fields.

    Timestamps are seconds since the epoch (Redis server time). ``transitions`` lists every
    state change: ``{"state", "from", "at", "attempt", ...reason/worker/error/delay}``.
    """

    id: str
    kind: str
    state: str
    priority: str
    spec: dict[str, Any]
    attempt: int = 0
    max_retries: int = 0
    retry_base: int = 0
    max_lost: int = 10
    lost_base: int = 0
    model: str = ""
    name: str | None = None
    gpus: int | float = 0  # whole GPUs, or a fraction of one (services.spec.gpus)
    cpus: int = 1
    created_at: float | None = None
    updated_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    retrying_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    transitions: list[dict[str, Any]] = field(default_factory=list)
    worker: str | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None
    lease_expiries: int = 0
    not_before: float | None = None
    error: str | None = None
    cause: str | None = None  # services.queue.causes.FailureCause of the last failed/lost attempt
    traceback: str | None = None
    result: Any = None
    progress: dict[str, Any] | None = None
    checkpoint: str | None = None
    # The last verified checkpoints, oldest first: [{epoch, uri, size, sha256}] (services.runs.checkpoints)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    idempotency_key: str | None = None
    seq: int = 0

    @classmethod
    def from_hash(cls, h: Mapping[Any, Any]) -> JobRecord:
        """Build from HGETALL output; tolerant of missing or garbled fields."""
        d = {_s(k): v for k, v in h.items()}
        spec = _json(d.get("spec"), {})
        spec = spec if isinstance(spec, dict) else {}
        progress = _json(d.get("progress"), None)
        spec_kind = spec.get("kind")
        return cls(
            id=_s(d.get("id")) or "",
            kind=_s(d.get("kind")) or (spec_kind if isinstance(spec_kind, str) else ""),
            state=_s(d.get("state")) or "",
            priority=_s(d.get("priority")) or "",
            spec=spec,
            attempt=_i(d.get("attempt")),
            max_retries=_i(d.get("max_retries")),
            retry_base=_i(d.get("retry_base")),
            max_lost=_i(d.get("max_lost"), 10),
            lost_base=_i(d.get("lost_base")),
            model=_s(d.get("model")) or "",
            name=_s(d.get("name")) or None,
            gpus=_gpus(d.get("gpus")),
            cpus=_i(d.get("cpus"), 1),
            created_at=_f(d.get("created_at")),
            updated_at=_f(d.get("updated_at")),
            queued_at=_f(d.get("queued_at")),
            started_at=_f(d.get("started_at")),
            retrying_at=_f(d.get("retrying_at")),
            finished_at=_f(d.get("finished_at")),
            heartbeat_at=_f(d.get("heartbeat_at")),
            transitions=_transitions(d.get("transitions")),
            worker=_s(d.get("worker")) or None,
            lease_token=_s(d.get("lease_token")) or None,
            lease_expires_at=_f(d.get("lease_expires_at")),
            lease_expiries=_i(d.get("lease_expiries")),
            not_before=_f(d.get("not_before")),
            error=_s(d.get("error")) or None,
            cause=_s(d.get("cause")) or None,
            traceback=_s(d.get("traceback")) or None,
            result=_json(d.get("result"), None),
            progress=progress if isinstance(progress, dict) else None,
            checkpoint=_s(d.get("checkpoint")) or None,
            checkpoints=_checkpoints(_json(d.get("checkpoints"), [])),
            cancel_requested=_s(d.get("cancel_requested")) == "1",
            idempotency_key=_s(d.get("idempotency_key")) or None,
            seq=_i(d.get("seq")),
        )

    @property
    def is_terminal(self) -> bool:
        state = JobState.parse(self.state)
        return state is not None and state.is_terminal

    @property
    def losses(self) -> int:
        """Attempts lost with their worker (lease expired) since the last manual retry."""
        return max(0, self.lease_expiries - self.lost_base)

    @property
    def retries_left(self) -> int:
        """Retries left for the job's own errors (lost attempts do not count, see max_lost)."""
        return max(0, self.max_retries + 1 - (self.attempt - self.retry_base - self.losses))

    @property
    def resources(self) -> dict[str, int | float]:
        return {"gpus": self.gpus, "cpus": self.cpus}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field except the lease token (a capability, not for display)."""
        d = asdict(self)
        d.pop("lease_token", None)
        return d


@dataclass
class PruneBatch:
    """What one ``JobQueue.prune`` call did: the ids removed (or, in a dry run, that would be),
    the index entries it examined, and whether more may be waiting (call again)."""

    job_ids: list[str]
    examined: int
    more: bool


@dataclass
class ClaimedJob:
    """What ``claim`` hands a worker: the validated spec plus the lease token to fence with."""

    job_id: str
    token: str
    attempt: int
    spec: AnySpec
    record: JobRecord

    @property
    def id(self) -> str:
        return self.job_id

    @property
    def checkpoint(self) -> str | None:
        """The last checkpoint of an earlier attempt, to resume from (None on a fresh start)."""
        return self.record.checkpoint


__all__ = ["AnySpec", "ClaimedJob", "JobRecord", "PruneBatch", "new_job_id"]
