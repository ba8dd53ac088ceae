"""Following a job while it runs: ``submit/eval/tune --follow`` and ``logs -f``. The events come
from ``EventLog.follow``; ``ProgressView`` (train/eval) and ``TuneProgressView`` (tune) render
them, as a progress bar per epoch on a terminal and one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from services.cli.helpers import App, UserError, echo, emit_json
from services.cli.render import describe_event, epoch_line, fmt_num, fmt_pct, fmt_time, print_results, ratio
from services.cli.tune_view import TuneProgressView
from services.queue.errors import JobNotFound
from services.queue.job import JobRecord
from services.queue.jobqueue import JobQueue
from services.queue.parsing import finite, printable
from services.queue.watch import follow_job


class JobEta:
    """The whole job's remaining time, from the fraction of its steps done at two event times
    (the events' own timestamps, so a replayed history gives the same estimate as a live one)."""

    def __init__(self) -> None:
        self._first: tuple[float, float] | None = None  # (event time, fraction done)

    def update(self, at: Any, done: float) -> float | None:
        """Seconds left at event time ``at`` with ``done`` (0..1) of the job's work behind it."""
        t = finite(at)
        if t is None or not 0 <= done <= 1:
            return None
        if self._first is None or done < self._first[1]:  # the first sighting, or a resumed attempt
            self._first = (t, done)
            return None
        t0, d0 = self._first
        if done <= d0 or t <= t0:
            return None
        return (1 - done) * (t - t0) / (done - d0)


def fmt_eta(seconds: float | None) -> str:
    """``job ETA 3m05s`` (``1h02m`` past an hour); "" while unknown."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"job ETA {text}"


class ProgressView:
    """Renders a job's events while following it: a click progress bar per epoch on a TTY,
    otherwise one line per epoch; state changes and log lines in between. ``epochs`` (the spec's)
    fills in the total where an event leaves it out; both views show the whole job's ETA."""

    def __init__(self, tty: bool, epochs: int | None = None) -> None:
        self.tty = tty
        self.epochs = epochs
        self.eta = JobEta()
        self._bar: Any = None
        self._bar_epoch: Any = None
        self._last_progress: dict[str, Any] | None = None

    def _total_epochs(self, data: Mapping[str, Any]) -> Any:
        total = data.get("epochs")
        return total if isinstance(total, int) and total > 0 else self.epochs

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
            self._bar = None
            self._bar_epoch = None

    def _line(self, text: str) -> None:
        if self._bar is not None:
            echo("")  # leave the bar's line as it is
        echo(text)
        if self._bar is not None:
            self._bar.render_progress()

    def handle(self, event: Mapping[str, Any]) -> None:
        etype, data = event.get("type"), event.get("data") or {}
        if not isinstance(data, Mapping):
            data = {"raw": data}
        if etype == "progress":
            if data == self._last_progress:  # the same progress published twice
                return
            self._last_progress = dict(data)
        stamp = fmt_time(event.get("at") or time.time())[-8:]
        if etype == "progress" and data.get("type") == "step":
            if self.tty:
                self._step(data, event.get("at"))
            return
        if etype == "progress" and data.get("type") == "epoch":
            self._close_bar()
            total = self._total_epochs(data)
            epoch = finite(data.get("epoch"))
            eta = (self.eta.update(event.get("at"), epoch / total)
                   if isinstance(total, int) and epoch is not None and 0 < epoch <= total else None)
            line = epoch_line({**data, "epochs": total if total is not None else "?"})
            echo(f"[{stamp}] epoch {line}" + (f"  {fmt_eta(eta)}" if eta is not None else ""))
            return
        if etype == "result":
            return
        line = describe_event(event)
        if line is not None:
            self._line(f"[{stamp}] {line}")
        if etype == "state":
            self._close_bar()

    def _step(self, data: Mapping[str, Any], at: Any = None) -> None:
        steps = data.get("steps_per_epoch")
        step = data.get("step")
        if not isinstance(steps, int) or steps <= 0 or ratio(step, steps) is None:
            return
        epoch = data.get("epoch")
        total = self._total_epochs(data)
        eta = None
        if isinstance(total, int) and isinstance(epoch, int) and 0 < epoch <= total:
            eta = self.eta.update(at, ((epoch - 1) * steps + min(int(finite(step) or 0), steps)) / (total * steps))
        if self._bar is None or self._bar_epoch != epoch:
            self._close_bar()
            label = f"epoch {epoch}/{total if total is not None else '?'}"
            self._bar = click.progressbar(length=steps, label=printable(label),
                                          show_eta=True, show_percent=True, show_pos=False,
                                          item_show_func=lambda item: item, width=30)
            self._bar.__enter__()
            self._bar_epoch = epoch
        status = (f"loss {fmt_num(data.get('loss'))}  acc {fmt_pct(data.get('accuracy'))}  "
                  f"{fmt_num(data.get('images_per_second'), '.0f')} img/s" + (f"  {fmt_eta(eta)}" if eta is not None else ""))
        target = min(int(finite(step) or 0), steps)
        self._bar.update(max(0, target - self._bar.pos), current_item=status)

    def close(self) -> None:
        self._close_bar()


def follow_events(queue: JobQueue, job_id: str, handle: Callable[[dict[str, Any]], None],
                  block_ms: int = 1000) -> JobRecord:
    """``follow_job`` with its one error as the CLI's: a job that vanished is one line, exit 1."""
    try:
        return follow_job(queue, job_id, handle, block_ms)
    except JobNotFound as err:
        raise UserError(str(err)) from None


def _write_raw(text: str) -> None:
    echo(text, nl=False)


def job_view(record: JobRecord, tty: bool,
             stamp: Callable[[Any], str] | None = None) -> ProgressView | TuneProgressView:
    """The live view for a job: trial lines and a running summary for tune jobs, epochs otherwise."""
    if record.kind == "tune":
        spec = record.spec if isinstance(record.spec, dict) else {}
        total = (record.progress or {}).get("trials") if isinstance(record.progress, dict) else None
        return TuneProgressView(_write_raw, tty, describe_event, spec=spec,
                                total=total if isinstance(total, int) else None,
                                **({"stamp": stamp} if stamp is not None else {}))
    spec = record.spec if isinstance(record.spec, dict) else {}
    epochs = spec.get("epochs")
    return ProgressView(tty=tty, epochs=epochs if isinstance(epochs, int) else None)


def wait_and_report(app: App, record: JobRecord, as_json: bool) -> None:
    """``--follow``: show progress until the job ends, then its results; exit 1 unless it succeeded."""
    queue = app.queue
    try:
        if as_json:
            final = follow_events(queue, record.id, lambda _e: None)
        else:
            view = job_view(record, tty=sys.stdout.isatty())
            try:
                final = follow_events(queue, record.id, view.handle)
            finally:
                view.close()
    except KeyboardInterrupt:
        echo(f"\nstopped following {record.id}; the job goes on (capsctl logs -f {record.id})", err=True)
        sys.exit(130)
    if as_json:
        emit_json(final.to_dict())
    elif final.state == "succeeded":
        echo("")
        print_results(final)
    else:
        echo(f"job {final.id} {final.state}" + (f": {final.error}" if final.error else ""), err=True)
    if final.state != "succeeded":
        sys.exit(1)

