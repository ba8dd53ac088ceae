"""The result document of a finished job: one typed, versioned shape for train, eval and tune.

The rank builds a ``JobResult``; the worker stores ``to_document()`` (plain JSON) in the job
record; every reader (``capsctl results``, ``compare``, the tune matrix, the Python client) gets
it back through ``JobResult.read``. Documents written before the type existed carry no
``version`` and read as version 0. Unknown keys are kept (``extra="allow"``), so a newer
writer's additions survive an older reader; a field whose value does not fit its type (a
garbled document) is dropped rather than losing the whole result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

RESULT_VERSION = 1


class JobResult(BaseModel):
    """What a job measured. Accuracies are fractions (0..1) keyed by test angle ("0", "15", ...)."""

    model_config = ConfigDict(extra="allow")

    version: int = 0  # 0: a document from before versioning; the writers set RESULT_VERSION
    kind: str | None = None
    model: str | None = None
    # train and eval
    rotation_accuracy: dict[str, float | None] | None = None
    per_class: dict[str, list[float | None]] | None = None
    confusion: dict[str, list[list[int]]] | None = None
    suite_accuracy: dict[str, float | None] | None = None
    history: list[dict[str, Any]] | None = None
    world_size: int | None = None
    device: str | None = None
    checkpoint: str | None = None
    validation: dict[str, Any] | None = None
    tensorboard: str | None = None  # the train job's event files (`tensorboard --logdir`)
    # tune
    eval_angles: list[str] | None = None
    experiment: str | None = None
    asha: bool | None = None
    models: dict[str, dict[str, Any]] | None = None
    trials: list[dict[str, Any]] | None = None
    artifacts: dict[str, Any] | None = None

    @classmethod
    def new(cls, kind: str, **fields: Any) -> JobResult:
        """A result as a writer builds it: the current version."""
        return cls.model_validate({**fields, "kind": kind, "version": RESULT_VERSION})

    @classmethod
    def read(cls, document: Any) -> JobResult | None:
        """The typed result of a stored document (None when there is none, or it is not an object)."""
        if isinstance(document, JobResult):
            return document
        if not isinstance(document, Mapping):
            return None
        data = dict(document)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            return cls.model_validate(_without_bad_entries(data, [err["loc"] for err in exc.errors()]))

    @property
    def is_tune(self) -> bool:
        return self.kind == "tune" and isinstance(self.models, dict)

    def to_document(self) -> dict[str, Any]:
        """The JSON object stored in Redis and printed by ``capsctl results --json``."""
        return self.model_dump(mode="json", exclude_none=True)


def _without_bad_entries(data: dict[str, Any], locations: list[tuple[Any, ...]]) -> dict[str, Any]:
    """``data`` less what failed validation: the one angle's entry of a per-angle dict (a garbled
    matrix at 35° leaves the other angles readable), else the whole field."""
    cleaned = dict(data)
    for loc in locations:
        if not loc or loc[0] not in cleaned:
            continue
        value = cleaned[loc[0]]
        if len(loc) > 1 and isinstance(value, dict) and loc[1] in value:
            cleaned[loc[0]] = {k: v for k, v in value.items() if k != loc[1]}
        else:
            del cleaned[loc[0]]
    return cleaned


def to_document(result: JobResult | Mapping[str, Any] | None) -> Any:
    """What the worker stores for a run's return value: a ``JobResult`` as its document; a
    kept result read back from disk is already one."""
    return result.to_document() if isinstance(result, JobResult) else result
