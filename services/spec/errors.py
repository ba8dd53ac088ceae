"""Turning a pydantic ``ValidationError`` on a job spec into ``SpecError``: one line that names the
field and says what it allows, e.g. ``gpus: must be an integer in 0..64 (got 65)``.

What a field allows comes from ``_HINTS`` for the fields whose rules live in validators, else is
described from the field's own type and bounds (``_describe``). The spec models themselves are in
services.spec.jobspec, which passes them in; this module knows none of them.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from capsnet_core.models.configs import MODEL_NAMES
from capsnet_core.suites import EVAL_SUITES
from services.spec.types import ANGLE_RANGE, KINDS, MAX_ANGLES

# What a field allows, for the fields whose rules live in validators rather than in their type
# (numbers, bounds and booleans are described from the field itself, see ``_hint``).
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


# Old field names still read on input (see the spec models' validation aliases): errors name the
# current field, since that is what the user should write from now on.
_RENAMED: dict[str, str] = {"workers": "cpu_ranks"}


class SpecError(ValueError):
    """An invalid job spec. ``str(err)`` is one line: ``<field>: <what is wrong / allowed>``."""

    def __init__(self, message: str, field: str = "") -> None:
        message = " ".join(str(message).split())
        super().__init__(message)
        self.field = field
        self.message = message


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
def _hint(model: type[BaseModel] | None, field: str, item: bool = False) -> str | None:
    """What ``field`` of a job of spec class ``model`` (or, with ``item``, one item of that list
    field) allows."""
    if field in (_ITEM_HINTS if item else _HINTS):
        return (_ITEM_HINTS if item else _HINTS)[field]
    info = model.model_fields.get("model_overrides" if field == "model_config" else field) if model else None
    if info is None:
        return None
    extra = info.json_schema_extra
    if not item and isinstance(extra, dict) and isinstance(extra.get("allows"), str):
        return extra["allows"]  # a field type that says it in words (e.g. services.spec.gpus.gpu_count)
    if not item:
        return _describe(info.annotation, info.metadata)
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return _describe(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is list else None


def allowed_values(model: type[BaseModel], field: str) -> str | None:
    """What a spec field allows, in words (``an integer in 1..1000``), for help texts; None when
    its rules are not a type's bounds (free text, choices click already lists)."""
    return _hint(model, field)


def format_error(err: Mapping[str, Any], kind: str | None,
                 models_by_kind: Mapping[str, type[BaseModel]]) -> SpecError:
    """The ``SpecError`` for one pydantic error (``ValidationError.errors()`` item) of a spec whose
    ``kind`` was given (None when it was missing or not a string)."""
    model = models_by_kind.get(kind or "")
    loc = list(err.get("loc", ()))
    if loc and loc[0] in KINDS and kind == loc[0]:
        loc = loc[1:]  # the discriminated union's tag
    if loc and loc[0] == "model_overrides":
        loc[0] = "model_config"
    typ = err.get("type", "")
    if loc and loc[0] in _RENAMED:
        if typ == "extra_forbidden":  # both spellings given
            new = _RENAMED[loc[0]]
            return SpecError(f"{loc[0]}: the old name of {new}; give only {new}", str(loc[0]))
        loc[0] = _RENAMED[loc[0]]
    field = _loc_str(loc)
    top = str(loc[0]) if loc else ""
    ctx = err.get("ctx") or {}
    got = f" (got {_short(err.get('input'))})"
    hint = _hint(model, top, item=len(loc) > 1 and isinstance(loc[1], int))

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
        allowed = sorted((f.alias or n) for n, f in model.model_fields.items()) if model else []
        return SpecError(f"{field}: unknown field for a {kind} job; allowed: {', '.join(allowed)}", field)
    if typ == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        return SpecError(f"{field}: must be one of {expected}{got}", field)
    if hint:
        return SpecError(f"{field}: must be {hint}{got}", field)
    return SpecError(f"{field}: {err.get('msg', 'invalid')}{got}", field)



__all__ = ["SpecError", "allowed_values", "format_error"]
