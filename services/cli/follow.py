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


class ProgressView:
    """Renders a job's events while following it: a click progress bar per epoch on a TTY,
    otherwise one line per epoch; state changes and log lines in between."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self._bar: Any = None
        self._bar_epoch: Any = None
        self._last_progress: dict[str, Any] | None = None

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
                self._step(data)
            return
        if etype == "progress" and data.get("type") == "epoch":
            self._close_bar()
            echo(f"[{stamp}] epoch {epoch_line(data)}")
            return
        if etype == "result":
            return
        line = describe_event(event)
        if line is not None:
            self._line(f"[{stamp}] {line}")
        if etype == "state":
            self._close_bar()

    def _step(self, data: Mapping[str, Any]) -> None:
        steps = data.get("steps_per_epoch")
        step = data.get("step")
        if not isinstance(steps, int) or steps <= 0 or ratio(step, steps) is None:
            return
        epoch = data.get("epoch")
        if self._bar is None or self._bar_epoch != epoch:
            self._close_bar()
            self._bar = click.progressbar(length=steps, label=printable(f"epoch {epoch}/{data.get('epochs', '?')}"),
                                          show_eta=True, show_percent=True, show_pos=False,
                                          item_show_func=lambda item: item, width=30)
            self._bar.__enter__()
            self._bar_epoch = epoch
        status = (f"loss {fmt_num(data.get('loss'))}  acc {fmt_pct(data.get('accuracy'))}  "
                  f"{fmt_num(data.get('images_per_second'), '.0f')} img/s")
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
    return ProgressView(tty=tty)


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

