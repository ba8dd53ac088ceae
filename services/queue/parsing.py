"""Total parsing of what Redis holds: text, numbers and JSON that never raise.

Anything can sit in Redis: a user's ``redis-cli``, a half-written key, another program sharing
the database. The queue and the CLI read it through these functions, which turn whatever they
get into a value of the expected type or a default, so that no content of Redis can make a
reader raise.

Text is decoded as UTF-8 with ``surrogateescape`` (as ``services.queue.connection.redis_client`` tells
redis-py to do): bytes that are not UTF-8 survive as lone surrogates, so a job id read from an
index still names the same key when it is sent back. ``printable`` turns such text into
something every terminal and JSON reader accepts, marking each undecodable byte as ``\\xNN``
(the same escape ``queue.lua`` writes into dead letters).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

# Deeper JSON than this in a stored value is junk (a spec, result or event is a few levels
# deep): refusing it keeps every later walk of it (rendering, json.dumps) far from the
# recursion limit.
MAX_JSON_DEPTH = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


def text(value: Any) -> str | None:
    """A stored value as text; None stays None. Bytes that are not UTF-8 are kept (as
    surrogates), so the text round-trips to the same bytes through ``redis_client``."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else str(value)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def printable(value: Any) -> str:
    """Text safe to print or put in JSON: undecodable bytes become ``\\xNN``, other lone
    surrogates (e.g. from a JSON ``"\\ud800"``) ``\\uNNNN``."""
    s = text(value)
    if s is None:
        return ""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape, s)
    return s


def finite(value: Any) -> float | None:
    """A finite float from a number or numeric text, else None (NaN, inf, junk, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(text(value) if isinstance(value, str | bytes | bytearray | memoryview) else value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def first(data: Mapping[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` that ``data`` holds and is not None, else None (for
    records whose writers named a field differently, e.g. ``loss`` or ``train_loss``)."""
    return next((data[k] for k in keys if data.get(k) is not None), None)


def integer(value: Any, default: int = 0) -> int:
    """An int from a number or numeric text ("3", "3.0"), else ``default``."""
    x = finite(value)
    return int(x) if x is not None else default


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def json_value(value: Any, default: Any = None) -> Any:
    """Parsed JSON text, or ``default`` for missing, invalid or absurdly nested JSON (never
    raises: huge integers, deep nesting and undecodable bytes included)."""
    s = text(value)
    if s is None or s == "":
        return default
    try:
        parsed = json.loads(s)
    except (ValueError, RecursionError):  # ValueError: not JSON, or an int of > 4300 digits
        return default
    return parsed if _depth_ok(parsed, MAX_JSON_DEPTH) else default


def wrong_type(err: BaseException) -> bool:
    """Whether a Redis reply error says the key holds another type (``WRONGTYPE``): junk in the
    key, which readers treat as "nothing readable here" rather than as a failure."""
    return str(err).startswith("WRONGTYPE")


def json_ready(obj: Any) -> Any:
    """``obj`` made fit for strict JSON output: text printable, NaN/inf as null, keys as
    text, tuples as lists, anything else as its printable ``str``."""
    if obj is None or isinstance(obj, bool | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | bytes):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return printable(str(obj))


__all__ = ["MAX_JSON_DEPTH", "finite", "first", "integer", "json_ready", "json_value", "printable", "text", "wrong_type"]
