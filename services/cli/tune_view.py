"""How a tune job reads while it runs: one line in words per trial event, and a running summary.

The worker publishes a ``progress`` event ``{"type": "trial", "trial": <key>, "status": ...}`` per
trial start, epoch and end (see ``tune_callback.SweepCallback``). This module turns them into lines
such as::

    trial t003 lenet5 shift2+rot15 seed 1: epoch 1/2, val 77.5 %
    trial t003 lenet5 shift2+rot15 seed 1: finished: 0° 89.0 %, 15° 82.4 %, 35° 50.5 %
    trial t007 lenet5 shift2 lr 0.003 seed 0: stopped early by ASHA after epoch 2/10 (val 71.0 %)
    trials: 3 finished, 2 running, 1 pending, 1 stopped (of 7); best val 91.2 % (t002)

and keeps the summary as the bottom line of a terminal, rewritten in place (plain lines, one per
trial that ends, when the output is not a terminal). No click here: the CLI hands in a ``write``
function and its own ``describe`` for the events that are not about trials.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.queue.parsing import finite

# Trial statuses (``status`` of a trial event) that end a trial in this attempt.
ENDED = ("finished", "restored", "early_stopped", "error")
CLEAR_LINE = "\r\x1b[K"  # carriage return + erase to the end of the line (every ANSI terminal)


def _pct(value: Any) -> str:
    v = finite(value)
    return "-" if v is None else f"{100 * v:.1f} %"


def _angle_order(key: Any) -> tuple[int, float, str]:
    try:
        return (0, float(key), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(key))


def _angle(key: Any) -> str:
    try:
        return f"{float(key):g}°"
    except (TypeError, ValueError):
        return str(key)


def short_trial_id(key: Any) -> str:
    """``t003-lenet5-shift2-lr0.001-s1`` -> ``t003`` (the key itself when it has another shape)."""
    text = str(key or "?")
    head = text.split("-", 1)[0]
    return head if head[:1] == "t" and head[1:].isdigit() else text


@dataclass(frozen=True)
class TrialLabels:
    """Which hyperparameters name a trial: lr and routing only when the study varies them."""

    lr: bool = False
    routing_iters: bool = False

    @classmethod
    def for_spec(cls, spec: Mapping[str, Any] | None) -> TrialLabels:
        spec = spec if isinstance(spec, Mapping) else {}
        lr, routing, samples = spec.get("lr"), spec.get("routing_iters"), spec.get("samples")
        return cls(lr=(isinstance(lr, list) and len(lr) > 1) or (isinstance(samples, int) and samples > 1),
                   routing_iters=isinstance(routing, list) and len(routing) > 1)


def trial_name(data: Mapping[str, Any], labels: TrialLabels = TrialLabels()) -> str:
    """``t003 lenet5 shift2+rot15 seed 1`` (+ ``lr 0.003`` / ``routing 3`` when the study varies them)."""
    parts = [short_trial_id(data.get("trial"))]
    for key in ("model", "augment"):
        if data.get(key) is not None:
            parts.append(str(data[key]))
    if labels.lr and isinstance(data.get("lr"), int | float):
        parts.append(f"lr {data['lr']:.3g}")
    if labels.routing_iters and data.get("routing_iters") is not None:
        parts.append(f"routing {data['routing_iters']}")
    if data.get("seed") is not None:
        parts.append(f"seed {data['seed']}")
    return " ".join(parts)


def _epochs(data: Mapping[str, Any]) -> str:
    return f"{data.get('epoch', '?')}/{data.get('epochs', '?')}"


def _rotation(data: Mapping[str, Any]) -> str:
    rot = data.get("rotation_accuracy")
    if not isinstance(rot, Mapping) or not rot:
        return ""
    return ", ".join(f"{_angle(a)} {_pct(rot[a])}" for a in sorted(rot, key=_angle_order))


def trial_line(data: Mapping[str, Any], labels: TrialLabels = TrialLabels()) -> str:
    """One trial event in words."""
    status = data.get("status")
    if status == "started":
        what = "started"
    elif status == "running":
        what = f"epoch {_epochs(data)}, val {_pct(data.get('val_accuracy'))}"
        if isinstance(data.get("epoch_seconds"), int | float):
            what += f" ({data['epoch_seconds']:.1f} s)"
    elif status == "finished":
        what = f"finished: {_rotation(data) or 'no accuracy recorded'}"
    elif status == "restored":
        what = f"finished in an earlier attempt: {_rotation(data) or 'no accuracy recorded'}"
    elif status == "early_stopped":
        what = "stopped early by ASHA"
        if data.get("epoch") is not None:
            what += f" after epoch {_epochs(data)}"
        if data.get("val_accuracy") is not None:
            what += f" (val {_pct(data['val_accuracy'])})"
    elif status == "resumed":
        what = f"resumed from its epoch {data.get('resumed_from_epoch', '?')}/{data.get('epochs', '?')} checkpoint"
    elif status == "error":
        what = "failed" + (f" (see {data['error_file']})" if data.get("error_file") else "")
    else:
        what = str(status or "?")
    return f"trial {trial_name(data, labels)}: {what}"


@dataclass
class TrialBoard:
    """The study's trials by state, from its events (finished / running / pending / stopped)."""

    total: int | None = None
    finished: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    best: tuple[float, str] | None = None

    def observe(self, event: Mapping[str, Any]) -> bool:
        """Take one event into account; True when it ended a trial (a moment worth a summary)."""
        etype, data = event.get("type"), event.get("data")
        if not isinstance(data, Mapping):
            return False
        if etype == "state" and data.get("state") in ("running", "retrying", "queued"):
            self.running.clear()  # a new attempt: what ran in the last one runs no more
            return False
        if etype == "log" and isinstance(data.get("trials"), int):  # "tune: N trials, k already finished"
            self.total = data["trials"]
            return False
        if etype == "progress" and data.get("type") == "tune" and isinstance(data.get("trials"), int):
            self.total = data["trials"]
            return False
        if etype != "progress" or data.get("type") != "trial" or data.get("trial") is None:
            return False
        key, status = str(data["trial"]), data.get("status")
        val = None if isinstance(data.get("val_accuracy"), str) else finite(data.get("val_accuracy"))
        if val is not None:
            if self.best is None or val > self.best[0]:
                self.best = (val, short_trial_id(key))
        if status in ("started", "running", "resumed"):
            self.failed.discard(key)
            if key not in self.finished and key not in self.stopped:
                self.running.add(key)
            return False
        if status in ENDED:
            self.running.discard(key)
            {"error": self.failed, "early_stopped": self.stopped}.get(str(status), self.finished).add(key)
            return True
        return False

    @property
    def pending(self) -> int | None:
        if self.total is None:
            return None
        return max(0, self.total - len(self.finished) - len(self.stopped) - len(self.failed) - len(self.running))

    def summary(self) -> str:
        parts = [f"{len(self.finished)} finished", f"{len(self.running)} running"]
        if self.pending is not None:
            parts.append(f"{self.pending} pending")
        parts.append(f"{len(self.stopped)} stopped")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        text = "trials: " + ", ".join(parts)
        if self.total is not None:
            text += f" (of {self.total})"
        if self.best is not None:
            text += f"; best val {_pct(self.best[0])} ({self.best[1]})"
        return text


class StatusLine:
    """Lines that scroll, and a status line kept at the bottom of a terminal, rewritten in place.

    Not a terminal (a pipe, a file, CI): nothing is rewritten; ``status`` prints a plain line
    when asked to (``milestone``) and its text changed since the last one."""

    def __init__(self, write: Callable[[str], None], tty: bool) -> None:
        self._write = write
        self.tty = tty
        self._shown: str | None = None  # the status on screen (tty) or last printed (not a tty)

    def line(self, text: str) -> None:
        if self.tty and self._shown is not None:
            self._write(CLEAR_LINE + text + "\n" + self._shown)
        else:
            self._write(text + "\n")

    def status(self, text: str, milestone: bool = False, prefix: str = "") -> None:
        if self.tty:
            self._write(CLEAR_LINE + text)
            self._shown = text
        elif milestone and text != self._shown:
            self._write(prefix + text + "\n")
            self._shown = text

    def close(self) -> None:
        if self.tty and self._shown is not None:
            self._write("\n")  # leave the last summary on screen
            self._shown = None


def clock_stamp(at: Any) -> str:
    """``[09:10:45] `` as ``--follow`` prints before each line."""
    try:
        ts = float(at) or time.time()
    except (TypeError, ValueError):
        ts = time.time()
    return _dt.datetime.fromtimestamp(ts).strftime("[%H:%M:%S] ")


class TuneProgressView:
    """Renders a tune job's events: trial events in words, other events through ``describe``
    (the CLI's one-liner), and the running summary of the study's trials."""

    def __init__(self, write: Callable[[str], None], tty: bool,
                 describe: Callable[[Mapping[str, Any]], str | None],
                 spec: Mapping[str, Any] | None = None, total: int | None = None,
                 stamp: Callable[[Any], str] = clock_stamp) -> None:
        self.out = StatusLine(write, tty)
        self.describe = describe
        self.labels = TrialLabels.for_spec(spec)
        self.board = TrialBoard(total=total)
        self.stamp = stamp
        self._last_progress: Any = None

    def handle(self, event: Mapping[str, Any]) -> None:
        etype, data = event.get("type"), event.get("data")
        if etype == "progress":
            if data == self._last_progress:  # the same progress published twice
                return
            self._last_progress = data
        ended = self.board.observe(event)
        if etype == "progress" and isinstance(data, Mapping) and data.get("type") == "trial":
            self.out.line(self.stamp(event.get("at")) + trial_line(data, self.labels))
        elif etype == "progress" and isinstance(data, Mapping) and data.get("type") == "tune":
            pass  # the job's own trial counter: the summary says it
        elif etype != "result":
            text = self.describe(event)
            if text is not None:
                self.out.line(self.stamp(event.get("at")) + text)
        if self.board.total is not None or self.board.running or ended:
            self.out.status(self.board.summary(), milestone=ended, prefix=self.stamp(event.get("at")))

    def close(self) -> None:
        self.out.close()


__all__ = ["StatusLine", "TrialBoard", "TrialLabels", "TuneProgressView", "clock_stamp", "short_trial_id",
           "trial_line", "trial_name"]
