"""Reusable parts of the job specs (services.spec.jobspec): the vocabulary and limits (kinds,
priorities, datasets, at most ``MAX_ANGLES`` angles and ``MAX_TRIALS`` trials), the strict
annotated field types (``bounded_int``, ``Rate``, ``AngleList``, ``SuiteList``) and the checks
that validators share (angles, augmentation presets, names, batch division, model config
overrides). Pure pydantic and capsnet_core config: no Redis, Ray or torch.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, Strict

from capsnet_core.models.configs import MODEL_NAMES, config_choices, config_maximum
from capsnet_core.models.configs import model_config_fields as _model_config_fields
from capsnet_core.presets import parse_preset
from capsnet_core.suites import EVAL_SUITES, check_suites

KINDS = ("train", "eval", "tune")
PRIORITIES = ("high", "normal", "low")
DATASETS = ("mnist", "fashion-mnist")
DEFAULT_ANGLES = (0.0, 15.0, 35.0)
DEFAULT_TUNE_MODELS = ("capsnet", "lenet5")  # the tutorial's pair; the rest of the zoo on request
MAX_ANGLES = 32
MAX_TRIALS = 5000
JOB_ID_RE = re.compile(r"^j-[0-9a-z]{6,12}-[0-9a-z]{4,12}$")
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
# The validation split carved from the training set (capsnet_core.validation.DEFAULT_VAL_SPLIT;
# repeated here because that module imports torch and a spec must validate without it).
DEFAULT_VAL_SPLIT = 5_000

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


def bounded_int(lo: int, hi: int | None = None) -> Any:
    """A strict integer in ``lo..hi`` (``"2"`` and ``true`` are refused); error hints read the bounds."""
    return Annotated[int, Strict(), Field(ge=lo, le=hi)]


def bounded_float(gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """A strict finite number within the given bounds."""
    return Annotated[float, Strict(), Field(gt=gt, ge=ge, le=le, allow_inf_nan=False)]


Bool = Annotated[bool, Strict()]
Angle = Annotated[float, Strict()]
Rate = bounded_float(gt=0, le=1)
ANGLE_RANGE = "[-180, 180]"


# ----------------------------------------------------------------------------- checks


def check_angles(values: list[float]) -> list[float]:
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
AngleList = Annotated[list[Angle], AfterValidator(check_angles)]
# Named test suites (capsnet_core.suites), each at most once.
SuiteList = Annotated[list[SuiteName], AfterValidator(check_suites)]


def check_preset(value: str) -> str:
    parse_preset(value)  # raises ValueError with a one-line explanation
    return value.strip()


def check_name(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip():
        raise ValueError("must not be blank")
    if len(value) > 100:
        raise ValueError(f"at most 100 characters allowed (got {len(value)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters or newlines")
    return value.strip()


# Tags travel into shell pipelines, file names and metric-free listings: a small safe alphabet
# and bounded sizes keep every one printable on one line and cheap to filter on.
MAX_TAGS = 20
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TAG_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/+@-]{1,128}")


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """At most MAX_TAGS ``key=value`` pairs: a key of 1-64 letters, digits, ``_ . -`` (starting
    with a letter or digit), a value of 1-128 letters, digits, ``_ . : / + @ -``."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags allowed (got {len(tags)})")
    for key, value in tags.items():
        if not TAG_KEY_RE.fullmatch(key):
            raise ValueError(f"tag key {key[:70]!r}: 1-64 characters of letters, digits, '_', '.', '-', "
                             "starting with a letter or digit")
        if not TAG_VALUE_RE.fullmatch(value):
            raise ValueError(f"tag {key}={value[:140]!r}: the value must be 1-128 characters of letters, digits "
                             "and _ . : / + @ -")
    return dict(tags)


def check_batch_divides(batch_size: int, ranks: int, option: str) -> None:
    """Every rank trains on batch_size / ranks images per step: refuse what would only fail
    once the ranks (and NCCL) are up, on every retry."""
    if batch_size % ranks == 0:
        return
    lower = batch_size - batch_size % ranks
    nearest = [n for n in (lower, lower + ranks) if n >= ranks]
    raise ValueError(f"batch_size: {batch_size} does not divide over {ranks} ranks ({option} {ranks}); "
                     f"nearest valid batch sizes: {', '.join(map(str, nearest))}")


def check_val_split(val_split: int, train_subset: int | None) -> None:
    """The validation images are carved from the training pool before any subset: both must fit."""
    if train_subset is not None and train_subset + val_split > TRAIN_IMAGES:
        raise ValueError(f"val_split: {val_split:,} validation images plus train_subset {train_subset:,} exceed the "
                         f"{TRAIN_IMAGES:,} training images; lower --val-split or --train-subset")


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


def check_model_config(models: list[str], config: dict[str, Any]) -> dict[str, Any]:
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


def kwargs_for(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that apply to model ``name`` (``check_model_config``'s flat or per-model form)."""
    if overrides and all(k in MODEL_NAMES for k in overrides):
        return dict(overrides.get(name, {}))
    fields = model_config_fields(name)
    return {k: v for k, v in overrides.items() if k in fields}

