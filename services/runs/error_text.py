"""A failed attempt's error as the operator needs it: the root cause in one line, and the full
traceback kept apart.

What ``trainer.fit()`` raises is Ray's wrapper, not the cause: a ``WorkerGroupError`` (its
``worker_failures`` hold each rank's own exception), a ``ControllerError`` (its
``controller_failure``), a ``RayTaskError`` (its ``cause``), a health check failure (its
``health_check_failure``), or an ``ActorDiedError`` whose actor's ``__init__`` raised: Ray keeps
only the text of that one (a remote traceback, with terminal colour codes), so its cause is read
from the traceback's last ``Type: message`` line. ``root_cause`` walks these (and
``__cause__``/``__context__`` of the wrappers) down to the first exception that is not a wrapper.

No Ray import at module level, so that pure modules may import this one; Ray's classes are
recognised by name when Ray is not loaded.
"""

from __future__ import annotations

import errno as errno_codes
import re
import traceback as tb
from dataclasses import dataclass

# CSI sequences (colours, cursor moves: ``\x1b[36m``), OSC sequences (``\x1b]...\x07``) and lone
# escape pairs: what Ray puts around ``ray::TrainController.__init__()``.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
# The last line of a Python traceback: ``OSError: [Errno 30] ...`` or ``pkg.mod.SomeError: ...``.
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Fault))"
                             r"(?::\s*(?P<message>.*))?$")
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
# Ray wrappers whose own message is not the cause (matched by class name: see the module doc).
_WRAPPERS = {"WorkerGroupError", "ControllerError", "TrainingFailedError", "RayTaskError", "RayActorError",
             "ActorDiedError", "WorkerHealthCheckFailedError", "UserExceptionWithTraceback", "TuneError"}
MAX_LINE_CHARS = 500


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, cursor moves)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class RootCause:
    """The root of a failure: its type name, message, errno (if an ``OSError`` or its text names
    one) and where it came from (``"rank 0"``, ``"controller"``, ``""`` for the driver)."""

    type_name: str
    message: str
    errno: int | None = None
    origin: str = ""

    def line(self) -> str:
        """One line, at most ``MAX_LINE_CHARS``: ``rank 0: OSError: [Errno 28] No space left``."""
        text = f"{self.type_name}: {self.message}" if self.message else self.type_name
        text = f"{self.origin}: {text}" if self.origin else text
        text = " ".join(strip_ansi(text).split())
        return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS - 3] + "..."


def _is_wrapper(exc: BaseException) -> bool:
    return any(cls.__name__ in _WRAPPERS for cls in type(exc).__mro__)


def _errno_of(exc: BaseException | None, text: str) -> int | None:
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return exc.errno
    found = _ERRNO_TEXT.search(text)
    return int(found.group(1)) if found else None


def cause_from_text(text: str, origin: str = "") -> RootCause | None:
    """The last ``Type: message`` line of a (remote) traceback's text, or None if there is none."""
    for raw in reversed(strip_ansi(text).splitlines()):
        match = _EXCEPTION_LINE.match(raw.rstrip())
        if match:
            message = (match.group("message") or "").strip()
            return RootCause(match.group("type").rsplit(".", 1)[-1], message, _errno_of(None, message), origin)
    return None


def _inner(exc: BaseException) -> tuple[BaseException | None, str]:
    """The exception ``exc`` wraps (and where it ran), or None when it wraps none we can reach."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures, key=lambda r: (not isinstance(r, int), r if isinstance(r, int) else 0))
        return failures[rank], f"rank {rank}"
    for attribute, origin in (("controller_failure", "controller"), ("health_check_failure", ""),
                              ("_base_exc", ""), ("cause", "")):
        inner = getattr(exc, attribute, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return inner, origin
    chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chained, ""


def root_cause(exc: BaseException) -> RootCause:
    """The exception at the root of ``exc``: through Ray's wrappers to a rank's or the controller's
    own error (see the module doc). An exception that is not a Ray wrapper is its own root."""
    origin, seen = "", set()
    current: BaseException = exc
    while _is_wrapper(current) and id(current) not in seen:
        seen.add(id(current))
        inner, where = _inner(current)
        origin = origin or where
        if inner is None:
            # An actor whose __init__ raised: Ray kept only the remote traceback's text.
            from_text = cause_from_text(str(current), origin or _actor_origin(str(current)))
            if from_text is not None:
                return from_text
            break
        current = inner
    lines = strip_ansi(str(current)).strip().splitlines()
    message = lines[0].strip() if lines else ""
    if _is_wrapper(current) or (len(lines) > 1 and "Traceback" in str(current)):
        # A wrapper we could not open, or a message that is itself a traceback: its last line says most.
        from_text = cause_from_text(str(current), origin)
        if from_text is not None:
            return from_text
    return RootCause(type(current).__name__, message, _errno_of(current, str(current)), origin)


def _actor_origin(text: str) -> str:
    """``controller`` for Ray Train's controller actor, ``actor Foo`` for another, else ``""``."""
    match = re.search(r"ray::(\w+)\.__init__\(\)", strip_ansi(text))
    if match is None:
        return ""
    return "controller" if match.group(1) == "TrainController" else f"actor {match.group(1)}"


def full_traceback(exc: BaseException) -> str:
    """Every traceback we hold for ``exc``: the driver's chain, then each rank's or the
    controller's own error (tracebacks Ray shipped back as text included), colour codes removed."""
    parts = ["".join(tb.format_exception(exc))]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        for rank, error in sorted(failures.items(), key=lambda item: str(item[0])):
            if isinstance(error, BaseException):
                parts.append(f"\n[rank {rank}]\n" + "".join(tb.format_exception(error)))
    controller = getattr(exc, "controller_failure", None)
    if isinstance(controller, BaseException):
        parts.append("\n[controller]\n" + "".join(tb.format_exception(controller)))
    return strip_ansi("".join(parts))


# errno values that mean the storage, not the job, is at fault.
STORAGE_FULL = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT})
STORAGE_READ_ONLY = frozenset({errno_codes.EROFS})
STORAGE_DENIED = frozenset({errno_codes.EACCES, errno_codes.EPERM})


__all__ = ["MAX_LINE_CHARS", "STORAGE_DENIED", "STORAGE_FULL", "STORAGE_READ_ONLY", "RootCause", "cause_from_text",
           "full_traceback", "root_cause", "strip_ansi"]
