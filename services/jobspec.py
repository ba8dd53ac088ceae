"""Job specifications: what a user may ask the cluster to do, validated before it is queued.

Three kinds share one discriminated union on ``kind``::

    {"kind": "train", "model": "capsnet", "gpus": 1, "epochs": 5, "augment": "shift2+rot15"}
    {"kind": "eval", "source": "j-m3x9k2a1-4f7q", "angles": [-45, 0, 45]}
    {"kind": "tune", "models": ["capsnet", "lenet5"], "angles": [0, 15, 35], "seeds": 3}

``parse_spec`` accepts a dict or JSON text and raises ``SpecError`` (a ``ValueError``) whose
message is one line naming the field and what is allowed, e.g. ``eval_angles: duplicate angle 15``.
Unknown fields are rejected everywhere. Numbers are strict: ``"2"`` or ``true`` is not an integer.

The JSON field ``model_config`` (model config overrides such as
``{"conv_channels": 16, "primary_maps": 4}``) is the Python attribute ``model_overrides``:
pydantic reserves ``model_config`` for itself. Use ``spec.model_kwargs(name)`` to get the
overrides for one model. Serialise with ``spec.to_json()`` / ``spec.to_dict()`` (by alias).
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from capsnet_core.models.configs import MODEL_NAMES, config_choices, config_maximum
from capsnet_core.models.configs import model_config_fields as _model_config_fields
from capsnet_core.presets import parse_preset, preset_for
from capsnet_core.suites import EVAL_SUITES, check_suites, with_suite_angles

KINDS = ("train", "eval", "tune")
PRIORITIES = ("high", "normal", "low")
DATASETS = ("mnist", "fashion-mnist")
DEFAULT_ANGLES = (0.0, 15.0, 35.0)
DEFAULT_TUNE_MODELS = ("capsnet", "lenet5")  # the tutorial's pair; the rest of the zoo on request
MAX_ANGLES = 32
MAX_TRIALS = 5000
JOB_ID_RE = re.compile(r"^j-[0-9a-z]{6,12}-[0-9a-z]{4,12}$")
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000

Priority = Literal["high", "normal", "low"]
Dataset = Literal["mnist", "fashion-mnist"]
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
SuiteName = Literal[EVAL_SUITES]  # type: ignore[valid-type]


@functools.cache
def _config_fields(name: str) -> tuple[tuple[str, Any], ...]:
    return tuple(_model_config_fields(name).items())


def model_config_fields(name: str) -> dict[str, Any]:
    """``capsnet_core.models.model_config_fields``, cached (it builds a config object per call)."""
    return dict(_config_fields(name))


def _int(lo: int, hi: int | None = None) -> Any:
    return Annotated[int, Strict(), Field(ge=lo, le=hi)]


def _float(gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    return Annotated[float, Strict(), Field(gt=gt, ge=ge, le=le, allow_inf_nan=False)]


Bool = Annotated[bool, Strict()]
Angle = Annotated[float, Strict()]
Rate = _float(gt=0, le=1)

# What a field allows, for the fields whose rules live in validators rather than in their type
# (numbers, bounds and booleans are described from the field itself, see ``_hint``).
ANGLE_RANGE = "[-180, 180]"
_HINTS: dict[str, str] = {
    "name": "a string of at most 100 characters",
    "source": "a job id or a checkpoint path",
    "augment": "an augmentation preset string such as 'shift2+rot15'",
    "angles": f"a list of 1..{MAX_ANGLES} numbers in {ANGLE_RANGE}",
    "eval_angles": f"a list of 1..{MAX_ANGLES} numbers in {ANGLE_RANGE}",
    "models": f"a list of model names ({', '.join(MODEL_NAMES)})",
    "model_config": "an object of model config overrides",
    "eval_suites": f"a list of test suites ({', '.join(EVAL_SUITES)})",
}
_ITEM_HINTS: dict[str, str] = {
    "angles": f"a number in {ANGLE_RANGE}",
    "eval_angles": f"a number in {ANGLE_RANGE}",
    "augment": "an augmentation preset string",
}


class SpecError(ValueError):
    """An invalid job spec. ``str(err)`` is one line: ``<field>: <what is wrong / allowed>``."""

    def __init__(self, message: str, field: str = "") -> None:
        message = " ".join(str(message).split())
        super().__init__(message)
        self.field = field
        self.message = message


# ----------------------------------------------------------------------------- checks


def _check_angles(values: list[float]) -> list[float]:
    if len(values) == 0:
        raise ValueError("must list at least one angle")
    if len(values) > MAX_ANGLES:
        raise ValueError(f"at most {MAX_ANGLES} angles allowed (got {len(values)})")
    seen: set[float] = set()
    out = []
    for a in values:
        a = float(a)
        if not math.isfinite(a) or not -180.0 <= a <= 180.0:
            raise ValueError(f"angle {a:g} is outside {ANGLE_RANGE}")
        if a in seen:
            raise ValueError(f"duplicate angle {a:g}")
        seen.add(a)
        out.append(a)
    return out


# A list of test or training rotations: 1..MAX_ANGLES distinct finite numbers in [-180, 180].
AngleList = Annotated[list[Angle], AfterValidator(_check_angles)]


def _check_preset(value: str) -> str:
    parse_preset(value)  # raises ValueError with a one-line explanation
    return value.strip()


def _check_name(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip():
        raise ValueError("must not be blank")
    if len(value) > 100:
        raise ValueError(f"at most 100 characters allowed (got {len(value)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters or newlines")
    return value.strip()


def _check_batch_divides(batch_size: int, ranks: int, option: str) -> None:
    """Every rank trains on batch_size / ranks images per step: refuse what would only fail
    once the ranks (and NCCL) are up, on every retry."""
    if batch_size % ranks == 0:
        return
    lower = batch_size - batch_size % ranks
    nearest = [n for n in (lower, lower + ranks) if n >= ranks]
    raise ValueError(f"batch_size: {batch_size} does not divide over {ranks} ranks ({option} {ranks}); "
                     f"nearest valid batch sizes: {', '.join(map(str, nearest))}")


def _check_config_value(model: str, key: str, value: Any, default: Any) -> Any:
    where = f"model_config.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {model} expects true or false (got {value!r})")
        return value
    if isinstance(default, int):
        top = config_maximum(model, key) or 65536
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{where}: {model} expects an integer in 1..{top} (got {value!r})")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {model} expects a number >= 0 (got {value!r})")
        return float(value)
    if isinstance(default, tuple):
        ok = (isinstance(value, list | tuple) and len(value) == len(default)
              and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536 for v in value))
        if not ok:
            raise ValueError(f"{where}: {model} expects a list of {len(default)} integers in 1..65536 "
                             f"(got {value!r})")
        return list(value)
    if isinstance(default, str):
        choices = config_choices(model, key)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = f"one of {', '.join(choices)}" if choices is not None else "a string"
            raise ValueError(f"{where}: {model} expects {allowed} (got {value!r})")
        return value
    return value


def _check_model_config(models: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Validate overrides against the models' config dataclasses (build_model's rules).

    Two forms: flat ``{"conv_channels": 16}`` (each key must belong to at least one of the
    job's models and applies to those that have it) or per model
    ``{"capsnet": {"conv_channels": 16}, "lenet5": {...}}``.
    """
    if not config:
        return {}
    fields = {m: model_config_fields(m) for m in models}
    if all(k in MODEL_NAMES for k in config) and all(isinstance(v, dict) for v in config.values()):
        out: dict[str, Any] = {}
        for model, sub in config.items():
            if model not in models:
                raise ValueError(f"model_config.{model}: {model} is not a model of this job "
                                 f"({', '.join(models)})")
            for key, value in sub.items():
                if key not in fields[model]:
                    raise ValueError(f"model_config.{model}.{key}: unknown {model} config field; "
                                     f"known: {', '.join(sorted(fields[model]))}")
                _check_config_value(model, key, value, fields[model][key])
            out[model] = {k: _check_config_value(model, k, v, fields[model][k]) for k, v in sub.items()}
        return out
    out = {}
    for key, value in config.items():
        owners = [m for m in models if key in fields[m]]
        if not owners:
            known = sorted(set().union(*fields.values()))
            raise ValueError(f"model_config.{key}: unknown {'/'.join(models)} config field; "
                             f"known: {', '.join(known)}")
        for m in owners:
            value = _check_config_value(m, key, value, fields[m][key])
        out[key] = value
    return out


# ----------------------------------------------------------------------------- models


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              protected_namespaces=(), validate_default=False)

    kind: str
    name: str | None = None
    priority: Priority = "normal"
    max_retries: _int(0, 20) = 2  # type: ignore[valid-type]
    # Lease expiries (worker SIGKILLed, node gone) are the infrastructure's fault, not the job's:
    # they have this budget of their own and never use up max_retries.
    max_lost: _int(0, 100) = 10  # type: ignore[valid-type]

    @field_validator("name")
    @classmethod
    def _v_name(cls, v: str | None) -> str | None:
        return _check_name(v)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    def resources(self) -> dict[str, int]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The model label used in metrics (``capsnet``, ``capsnet+lenet5``, ``-`` for eval)."""
        return "-"


class TrainSpec(_SpecBase):
    kind: Literal["train"] = "train"
    model: ModelName = "capsnet"
    gpus: _int(0, 64) = 0  # type: ignore[valid-type]
    workers: _int(1, 64) = 1  # type: ignore[valid-type]
    epochs: _int(1, 1000) = 10  # type: ignore[valid-type]
    batch_size: _int(1, 65536) = 128  # type: ignore[valid-type]
    lr: Rate = 1e-3  # type: ignore[valid-type]
    lr_decay: Rate = 1.0  # type: ignore[valid-type]
    augment: str = "shift2"
    eval_angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    dataset: Dataset = "mnist"
    seed: _int(0, 2**32 - 1) = 0  # type: ignore[valid-type]
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    train_subset: _int(1, TRAIN_IMAGES) | None = None  # type: ignore[valid-type]
    test_subset: _int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    # Named test suites (capsnet_core.suites): "rotation" adds 0..180 in 15-degree steps to
    # eval_angles and reports their AUC; "affine" adds the affine-MNIST (or affNIST) accuracy.
    eval_suites: list[SuiteName] = Field(default_factory=list)

    @field_validator("augment")
    @classmethod
    def _v_augment(cls, v: str) -> str:
        return _check_preset(v)

    @field_validator("eval_suites")
    @classmethod
    def _v_suites(cls, v: list[str]) -> list[str]:
        return check_suites(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainSpec:
        if self.gpus > 0 and self.workers not in (1, self.gpus):
            raise ValueError(f"workers: with gpus > 0 there is one rank per GPU; leave workers at 1 "
                             f"(got workers={self.workers}, gpus={self.gpus})")
        if self.batch_size < self.ranks:
            raise ValueError(f"batch_size: must be at least the number of ranks ({self.ranks}), "
                             f"got {self.batch_size}")
        _check_batch_divides(self.batch_size, self.ranks, "--gpus" if self.gpus > 0 else "--cpu-ranks")
        object.__setattr__(self, "model_overrides", _check_model_config([self.model], self.model_overrides))
        object.__setattr__(self, "eval_angles", _check_angles(with_suite_angles(self.eval_angles, self.eval_suites)))
        return self

    @property
    def ranks(self) -> int:
        """Data-parallel processes: one per GPU, else ``workers`` CPU ranks."""
        return self.gpus if self.gpus > 0 else self.workers

    def resources(self) -> dict[str, int]:
        return {"gpus": self.gpus, "cpus": self.ranks}

    def model_kwargs(self, name: str | None = None) -> dict[str, Any]:
        return _kwargs_for(name or self.model, self.model_overrides)

    @property
    def label(self) -> str:
        return self.model


class EvalSpec(_SpecBase):
    kind: Literal["eval"] = "eval"
    source: str
    gpus: _int(0, 1) = 0  # type: ignore[valid-type]  # CUDA only when it holds a GPU
    angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    dataset: Dataset = "mnist"
    test_subset: _int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    eval_suites: list[SuiteName] = Field(default_factory=list)

    @field_validator("eval_suites")
    @classmethod
    def _v_suites(cls, v: list[str]) -> list[str]:
        return check_suites(v)

    @model_validator(mode="after")
    def _suite_angles(self) -> EvalSpec:
        object.__setattr__(self, "angles", _check_angles(with_suite_angles(self.angles, self.eval_suites)))
        return self

    @field_validator("source")
    @classmethod
    def _v_source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must be a job id (j-...) or a checkpoint path")
        if len(v) > 1024 or any(ord(c) < 32 for c in v):
            raise ValueError("must be a job id or a checkpoint path of at most 1024 printable characters")
        return v

    @property
    def source_job(self) -> str | None:
        """The job id when ``source`` names a job, else None (then it is a checkpoint path)."""
        return self.source if JOB_ID_RE.match(self.source) else None

    def resources(self) -> dict[str, int]:
        return {"gpus": self.gpus, "cpus": 1}


class TuneSpec(_SpecBase):
    kind: Literal["tune"] = "tune"
    models: list[ModelName] = Field(default_factory=lambda: list(DEFAULT_TUNE_MODELS))
    angles: AngleList = Field(default_factory=lambda: list(DEFAULT_ANGLES))
    eval_angles: AngleList | None = None
    augment: list[str] | None = None
    lr: list[Rate] | None = None  # type: ignore[valid-type]
    routing_iters: list[_int(1, 10)] | None = None  # type: ignore[valid-type]
    samples: _int(1, 1000) = 1  # type: ignore[valid-type]
    seeds: _int(1, 10) = 1  # type: ignore[valid-type]
    seed: _int(0, 2**32 - 1) = 0  # type: ignore[valid-type]
    epochs: _int(1, 1000) = 10  # type: ignore[valid-type]
    batch_size: _int(1, 65536) = 128  # type: ignore[valid-type]
    gpus_per_trial: _int(0, 8) = 0  # type: ignore[valid-type]
    max_concurrent: _int(1, 64) = 2  # type: ignore[valid-type]
    asha: Bool = True
    dataset: Dataset = "mnist"
    train_subset: _int(1, TRAIN_IMAGES) | None = None  # type: ignore[valid-type]
    test_subset: _int(1, TEST_IMAGES) | None = None  # type: ignore[valid-type]
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    eval_suites: list[SuiteName] = Field(default_factory=list)

    @field_validator("eval_suites")
    @classmethod
    def _v_suites(cls, v: list[str]) -> list[str]:
        return check_suites(v)

    @field_validator("models")
    @classmethod
    def _v_models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must list at least one model ({', '.join(MODEL_NAMES)})")
        dup = next((m for i, m in enumerate(v) if m in v[:i]), None)
        if dup:
            raise ValueError(f"duplicate model {dup}")
        return v

    @field_validator("augment")
    @classmethod
    def _v_augment(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = []
        for i, preset in enumerate(v):
            try:
                out.append(_check_preset(preset))
            except ValueError as err:
                raise ValueError(f"[{i}] {err}") from None
        return out

    @field_validator("lr", "routing_iters")
    @classmethod
    def _v_grid(cls, v: list[Any] | None) -> list[Any] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must list at least one value, or be left out")
        if len(v) > 16:
            raise ValueError(f"at most 16 values allowed (got {len(v)})")
        dup = next((x for i, x in enumerate(v) if x in v[:i]), None)
        if dup is not None:
            raise ValueError(f"duplicate value {dup:g}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> TuneSpec:
        if self.eval_angles is None:
            object.__setattr__(self, "eval_angles", list(self.angles))
        object.__setattr__(self, "eval_angles", _check_angles(with_suite_angles(self.eval_angles or [],
                                                                                self.eval_suites)))
        if self.augment is None:
            object.__setattr__(self, "augment", [preset_for(2, abs(a)) for a in self.angles])
        elif len(self.augment) != len(self.angles):
            raise ValueError(f"augment: must list one preset per training angle ({len(self.angles)} angles, "
                             f"got {len(self.augment)} presets)")
        if self.gpus_per_trial > 1:
            _check_batch_divides(self.batch_size, self.gpus_per_trial, "--gpus-per-trial")
        if self.routing_iters is not None and "capsnet" not in self.models:
            raise ValueError("routing_iters: only applies to capsnet, which is not in models")
        object.__setattr__(self, "model_overrides", _check_model_config(list(self.models), self.model_overrides))
        n = self.num_trials()
        if n > MAX_TRIALS:
            raise ValueError(f"samples: the search has {n} trials, more than the {MAX_TRIALS} allowed; "
                             f"use fewer models, angles, lr, routing_iters, seeds or samples")
        return self

    def conditions(self) -> list[tuple[float, str]]:
        """(training angle, augmentation preset) pairs."""
        return list(zip(self.angles, self.augment or [], strict=True))

    def num_trials(self) -> int:
        per_model = 0
        for m in self.models:
            routing = len(self.routing_iters) if (m == "capsnet" and self.routing_iters) else 1
            per_model += len(self.angles) * len(self.lr or [None]) * routing
        return per_model * self.seeds * self.samples

    def resources(self) -> dict[str, int]:
        """Peak demand: ``min(max_concurrent, trials)`` trials at once, one CPU each."""
        concurrent = min(self.max_concurrent, self.num_trials())
        return {"gpus": self.gpus_per_trial * concurrent, "cpus": concurrent}

    def model_kwargs(self, name: str) -> dict[str, Any]:
        return _kwargs_for(name, self.model_overrides)

    @property
    def label(self) -> str:
        return "+".join(sorted(self.models))


def _kwargs_for(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if overrides and all(k in MODEL_NAMES for k in overrides):
        return dict(overrides.get(name, {}))
    fields = model_config_fields(name)
    return {k: v for k, v in overrides.items() if k in fields}


JobSpec = Annotated[TrainSpec | EvalSpec | TuneSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
_MODELS_BY_KIND: dict[str, type[_SpecBase]] = {"train": TrainSpec, "eval": EvalSpec, "tune": TuneSpec}


# ----------------------------------------------------------------------------- errors


def _loc_str(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(metadata: Iterable[Any]) -> dict[str, Any]:
    """The ``gt``/``ge``/``lt``/``le`` bounds among a field's constraints (nested ``Field``s too)."""
    out: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            out.update(_bounds(item.metadata))
            continue
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(item, attr, None) is not None:
                out[attr] = getattr(item, attr)
    return out


def _describe(annotation: Any, metadata: Iterable[Any] = ()) -> str | None:
    """What a type allows, in words, from its own constraints: ``an integer in 0..64``, ``a number
    in (0, 1]``, ``true or false``, ``a list of integers in 1..10``; None when it cannot tell."""
    metadata = list(metadata)
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        return _describe(base, [*extra, *metadata])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        inner = _describe(args[0], metadata)
        is_list = typing.get_origin(args[0]) is list  # an optional list may simply be left out
        return None if inner is None else inner if is_list else f"{inner} or null"
    if origin is list:
        item = _describe(typing.get_args(annotation)[0])
        if item is None:
            return None
        return item.replace("an integer", "a list of integers", 1).replace("a number", "a list of numbers", 1)
    if annotation is bool:
        return "true or false"
    bounds = _bounds(metadata)
    if annotation is int and "ge" in bounds and "le" in bounds:
        lo, hi = bounds["ge"], bounds["le"]
        return f"{lo} or {hi}" if hi == lo + 1 else f"an integer in {lo}..{hi}"
    if annotation is float and ("gt" in bounds or "ge" in bounds) and ("lt" in bounds or "le" in bounds):
        low = f"({bounds['gt']:g}" if "gt" in bounds else f"[{bounds['ge']:g}"
        high = f"{bounds['lt']:g})" if "lt" in bounds else f"{bounds['le']:g}]"
        return f"a number in {low}, {high}"
    return None


@functools.cache
def _hint(kind: str | None, field: str, item: bool = False) -> str | None:
    """What ``field`` of a ``kind`` job (or, with ``item``, one item of that list field) allows."""
    if field in (_ITEM_HINTS if item else _HINTS):
        return (_ITEM_HINTS if item else _HINTS)[field]
    model = _MODELS_BY_KIND.get(kind or "")
    info = model.model_fields.get("model_overrides" if field == "model_config" else field) if model else None
    if info is None:
        return None
    if not item:
        return _describe(info.annotation, info.metadata)
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return _describe(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is list else None


def _format_error(err: dict[str, Any], kind: str | None) -> SpecError:
    loc = list(err.get("loc", ()))
    if loc and loc[0] in KINDS and kind == loc[0]:
        loc = loc[1:]  # the discriminated union's tag
    if loc and loc[0] == "model_overrides":
        loc[0] = "model_config"
    field = _loc_str(loc)
    top = str(loc[0]) if loc else ""
    typ = err.get("type", "")
    ctx = err.get("ctx") or {}
    got = f" (got {_short(err.get('input'))})"
    hint = _hint(kind, top, item=len(loc) > 1 and isinstance(loc[1], int))

    if typ == "value_error":
        text = str(ctx.get("error", err.get("msg", "")))
        if not field:  # model validators put the field in the message themselves
            return SpecError(text, text.split(":", 1)[0])
        if text.startswith("["):  # list item errors from list validators: "[2] ..."
            idx, _, rest = text.partition("] ")
            return SpecError(f"{field}{idx}]: {rest}", f"{field}{idx}]")
        return SpecError(f"{field}: {text}", field)
    if typ == "union_tag_invalid":
        return SpecError(f"kind: must be one of {', '.join(KINDS)} (got {_short(ctx.get('tag'))})", "kind")
    if typ == "union_tag_not_found":
        return SpecError(f"kind: required; one of {', '.join(KINDS)}", "kind")
    if typ == "missing":
        return SpecError(f"{field}: required" + (f"; {hint}" if hint else ""), field)
    if typ == "extra_forbidden":
        model = _MODELS_BY_KIND.get(kind or "")
        allowed = sorted((f.alias or n) for n, f in model.model_fields.items()) if model else []
        return SpecError(f"{field}: unknown field for a {kind} job; allowed: {', '.join(allowed)}", field)
    if typ == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        return SpecError(f"{field}: must be one of {expected}{got}", field)
    if hint:
        return SpecError(f"{field}: must be {hint}{got}", field)
    return SpecError(f"{field}: {err.get('msg', 'invalid')}{got}", field)


def check_model_size(spec: TrainSpec | EvalSpec | TuneSpec, max_params: int) -> None:
    """Refuse a model config a worker could not hold: the parameter count is estimated from the
    config (``estimate_model_size``: no weights are allocated) and must stay within max_params."""
    from capsnet_core.models import estimate_model_size

    if isinstance(spec, TrainSpec):
        models = [spec.model]
    elif isinstance(spec, TuneSpec):
        models = list(spec.models)
    else:
        return
    for model in models:
        params, activations = estimate_model_size(model, **spec.model_kwargs(model))
        if params > max_params:
            per_sample = f", ~{activations * 4 / 2**20:.1f} MiB of activations per sample" if activations else ""
            raise SpecError(f"model_config: {model} would have ~{params:,} parameters ({params * 4 / 2**20:.0f} MiB"
                            f"{per_sample}), above the limit of {max_params:,} (CAPSNET_MAX_PARAMS)", "model_config")


def parse_spec(data: Any) -> TrainSpec | EvalSpec | TuneSpec:
    """Validate a job spec given as a dict, JSON text or an already-built spec."""
    if isinstance(data, _SpecBase):
        return data  # type: ignore[return-value]
    if isinstance(data, bytes | bytearray):
        data = data.decode("utf-8", errors="replace")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise SpecError(f"spec: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                            "spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec: must be a JSON object with a kind of {', '.join(KINDS)} "
                        f"(got {type(data).__name__})", "spec")
    kind = data.get("kind") if isinstance(data.get("kind"), str) else None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        raise _format_error(errors[0], kind) from None


__all__ = [
    "DATASETS", "DEFAULT_ANGLES", "JOB_ID_RE", "KINDS", "PRIORITIES", "EvalSpec", "JobSpec", "SpecError",
    "TrainSpec", "TuneSpec", "check_model_size", "parse_spec",
]
