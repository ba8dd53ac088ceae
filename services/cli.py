"""``capsctl``: submit and watch capsule-network jobs (one click group, in the style of rq/flask).

Settings come from, in order of precedence: command-line options, the environment
(``CAPSNET_REDIS_URL``, ``CAPSNET_REDIS_PREFIX``, ``CAPSNET_STATE_DIR``, ``CAPSNET_ARTIFACTS``,
``RAY_ADDRESS`` ...), then ``<state_dir>/env`` written by ``capsctl up`` (so commands find the
Redis that ``up`` started, even on a non-default port), then the defaults of ``services.config``.
Every command option can also be set as ``CAPSCTL_<COMMAND>_<OPTION>`` (click's
``auto_envvar_prefix``), e.g. ``CAPSCTL_SUBMIT_EPOCHS=3``.

Exit codes:

* 0 — done. ``status``/``logs -f`` of a failed job still exit 0: only commands that wait for a
  job (``submit/eval/tune --follow``) report its failure.
* 1 — a job waited for failed or was cancelled; or the command could not do its work:
  Redis unreachable, unknown job id, a job in the wrong state (cancel a finished job), no result.
* 2 — bad usage, nothing was done: unknown options or values (click's usage errors), an
  invalid job spec (the spec's own one-line message, e.g. ``epochs: must be an integer in
  1..1000 (got 0)``), a job bigger than every live worker, an eval of a job or path that does
  not exist, an idempotency key reused with a different spec, an invalid setting in the environment.

Errors are one ``Error: ...`` line on stderr, never a traceback. Read commands take ``--json``
(stable keys; ``logs --json`` writes one JSON object per line).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import redis

from capsnet_core.models.configs import MODEL_DESCRIPTIONS, MODEL_NAMES

from . import compare as compare_mod
from . import stack as stack_mod
from .admission import shortfall
from .config import Settings, SettingsError, redis_client
from .jobspec import DATASETS, JOB_ID_RE, PRIORITIES, EvalSpec, SpecError, check_model_size, parse_spec
from .keys import Keys
from .parsing import finite, json_ready, printable
from .queue import (
    STATES,
    CapacityError,
    IdempotencyConflict,
    JobNotFound,
    JobQueue,
    JobRecord,
    JobStateError,
    QueueError,
    resource_shape,
    worker_resources,
)
from .sources import SourceRefused, check_checkpoint_file, check_source_allowed, local_checkpoint_file
from .tune_view import TuneProgressView

CONTEXT_SETTINGS = {"auto_envvar_prefix": "CAPSCTL", "help_option_names": ["-h", "--help"],
                    "max_content_width": 110}
MODELS = MODEL_NAMES


# ----------------------------------------------------------------------------- errors


class UserError(click.ClickException):
    """A one-line error; ``exit_code`` 1 (could not do it) unless given."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(" ".join(printable(message).split()))
        self.exit_code = exit_code


class SpecUsageError(UserError):
    """An invalid job spec or request: exit code 2, the spec's own one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def unreachable_message(url: str, err: BaseException | str) -> str:
    reason = " ".join(str(err).split())
    if not reason and isinstance(err, BaseException):
        reason = type(err).__name__
    return (f"cannot reach Redis at {stack_mod.redact_url(url)}: {reason} — start it with `capsctl up` "
            f"or set CAPSNET_REDIS_URL")


def reject_non_utf8(ctx: click.Context) -> None:
    """Arguments (and option values from the environment) that are not valid UTF-8 reach Python
    as text with surrogates, which could neither be stored in Redis nor printed: a usage error."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, str | os.PathLike):
                item_text = os.fspath(item)
                if isinstance(item_text, str) and printable(item_text) != item_text:
                    raise click.BadParameter(f"not valid UTF-8 text: {printable(item_text)}", ctx=ctx,
                                             param=param)


class CapsCommand(click.Command):
    """A capsctl command: its arguments must be UTF-8 text."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        reject_non_utf8(ctx)
        return rest


def redis_failure_message(url: str, err: BaseException) -> str:
    """One line for anything that went wrong between capsctl and Redis: refused or timed-out
    connections, wrong credentials, a database number the server lacks, a port that speaks
    another protocol, a TLS handshake that fails, or an error reply to a command."""
    where = stack_mod.redact_url(url)
    reason = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return f"Redis at {where} refused the credentials: {reason}"
    if isinstance(err, redis.InvalidResponse):
        return (f"{where} does not answer in the Redis protocol ({reason}): is CAPSNET_REDIS_URL the address "
                f"of another service?")
    if isinstance(err, redis.ResponseError) and "db index" in reason.lower():
        return f"Redis at {where}: {reason} (the URL's database number is beyond the server's `databases` setting)"
    if isinstance(err, redis.ConnectionError | redis.TimeoutError | OSError):
        message = unreachable_message(url, err)
        if url.startswith("rediss://"):
            message += " (rediss:// needs a TLS port: is the server listening with --tls-port?)"
        return message
    return f"Redis at {where} failed: {type(err).__name__}: {reason}"


class CapsGroup(click.Group):
    """Turns the service's user errors into one-line click errors with their exit codes."""

    command_class = CapsCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        reject_non_utf8(ctx)
        return rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpecError as err:
            raise SpecUsageError(str(err)) from None
        except (CapacityError, IdempotencyConflict) as err:
            raise SpecUsageError(str(err)) from None
        except SettingsError as err:
            raise UserError(str(err), exit_code=2) from None
        except (JobNotFound, JobStateError, QueueError) as err:
            raise UserError(str(err)) from None
        except stack_mod.StackError as err:
            first, *rest = str(err).splitlines() or [""]
            if rest:  # a log tail: shown before the one-line error
                echo("\n".join(rest), err=True)
            raise UserError(first) from None
        except redis.RedisError as err:  # every Redis-side failure: one line, exit 1
            app = ctx.find_object(App)
            url = app.settings.redis_url if app is not None and app.has_settings else "?"
            raise UserError(redis_failure_message(url, err)) from None


# ----------------------------------------------------------------------------- app context


class App:
    """Per-invocation state: the settings (built lazily, so ``--help`` never needs Redis) and
    the queue (connected on first use, with a PING so an unreachable Redis is one clear line)."""

    def __init__(self, overrides: dict[str, Any], state_dir: Path | None) -> None:
        self._overrides = overrides
        self._state_dir = state_dir
        self._settings: Settings | None = None
        self._queue: JobQueue | None = None

    @property
    def has_settings(self) -> bool:
        return self._settings is not None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                base = Settings.from_env(**({"state_dir": self._state_dir} if self._state_dir else {}))
                stack_env = stack_mod.load_env(base.state_dir)
                env = {**stack_env, **os.environ}  # the real environment wins over the stack's file
                overrides = dict(self._overrides)
                if self._state_dir:
                    overrides["state_dir"] = self._state_dir
                self._settings = Settings.from_env(env, **overrides)
            except SettingsError as err:
                raise UserError(str(err), exit_code=2) from None
        return self._settings

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            settings = self.settings
            try:
                client = redis_client(settings, socket_connect_timeout=3)
                client.ping()
            except (redis.RedisError, OSError) as err:
                raise UserError(redis_failure_message(settings.redis_url, err)) from None
            except ValueError as err:  # a malformed URL
                raise UserError(f"CAPSNET_REDIS_URL: {err}", exit_code=2) from None
            self._queue = JobQueue(client, Keys(settings.redis_prefix), lease_seconds=settings.lease_seconds)
        return self._queue

    def job(self, job_id: str) -> JobRecord:
        record = self.queue.get(job_id)
        if record is None:
            raise UserError(f"no job {job_id} (see `capsctl list`)")
        return record


pass_app = click.make_pass_decorator(App)


def echo(message: Any = "", err: bool = False, nl: bool = True) -> None:
    """``click.echo`` of printable text: whatever Redis held (bytes that are not UTF-8, lone
    surrogates from JSON) is escaped rather than making the write fail."""
    click.echo(printable(message), err=err, nl=nl)


def _emit_json(obj: Any) -> None:
    echo(json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False))


# ----------------------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """Plain aligned columns (two spaces apart); columns in ``right`` are right-aligned."""
    rows = [["" if v is None else printable(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def fmt_time(ts: Any) -> str:
    """Local time of a timestamp; "-" when there is none, "invalid" when it is not a time."""
    if ts is None or ts == "" or ts == 0:
        return "-"
    value = finite(ts)
    try:
        return _dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "invalid"


def fmt_age(ts: Any, now: float | None = None) -> str:
    if ts is None or ts == "" or ts == 0:
        return "-"
    value = finite(ts)
    if value is None:
        return "invalid"
    secs = max(0.0, (now or time.time()) - value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit}"
    return f"{int(secs)}s"


def fmt_pct(value: Any, digits: int = 2) -> str:
    v = finite(value)
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def fmt_num(value: Any, fmt: str = ".4f") -> str:
    v = finite(value)
    return "-" if v is None else format(v, fmt)


def fmt_angle(angle: Any) -> str:
    v = finite(angle)
    return printable(angle) if v is None else f"{v:g}°"


def _angle_sorted(keys: Iterable[Any]) -> list[Any]:
    def key(a: Any) -> tuple[int, float, str]:
        v = finite(a)
        return (1, 0.0, printable(a)) if v is None else (0, v, "")

    return sorted(keys, key=key)


def fmt_value(value: Any) -> str:
    """Any stored JSON value as one short cell: text as is, the rest as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:  # surrogates kept (ensure_ascii=False), so that echo shows undecodable bytes as \xNN
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def fmt_progress(record: JobRecord) -> str:
    """A short progress cell such as ``ep 3/10 87%``."""
    if record.state == "succeeded":
        return "done"
    p = record.progress or {}
    if not p:
        return "-"
    if p.get("type") == "eval" and record.kind == "train":
        return f"ep {p.get('epoch', '?')}/{p.get('epochs', '?')} eval"
    if p.get("epoch") is not None and p.get("epochs") is not None:
        text = f"ep {p['epoch']}/{p['epochs']}"
        step, steps = p.get("step"), p.get("steps_per_epoch")
        if p.get("type") == "epoch":
            text += " 100%"
        elif (fraction := _ratio(step, steps)) is not None:
            text += f" {min(1.0, fraction):.0%}"
        return text
    if p.get("trials") is not None:
        return f"trials {p.get('trials_done', p.get('done', '?'))}/{p['trials']}"
    if p.get("type") == "eval":
        return "eval"
    return "-"


def _ratio(part: Any, whole: Any) -> float | None:
    """part / whole for finite numbers with whole > 0 (None otherwise, never an overflow)."""
    if isinstance(part, bool) or isinstance(whole, bool) or not isinstance(part, int | float) \
            or not isinstance(whole, int | float):
        return None
    a, b = finite(part), finite(whole)
    return a / b if a is not None and b is not None and b > 0 else None


def _g(value: float) -> str:
    return f"{value:g}"


def describe_event(event: Mapping[str, Any], *, steps: bool = False) -> str | None:
    """One line for an event (None: not worth a line, e.g. step progress unless ``steps``)."""
    etype, data = event.get("type"), event.get("data") or {}
    if not isinstance(data, Mapping):
        data = {"raw": data}
    if etype == "state":
        parts = [fmt_value(data.get("state", "?"))]
        if data.get("from"):
            parts[0] = f"{fmt_value(data['from'])} -> {parts[0]}"
        if data.get("attempt"):
            parts.append(f"attempt {fmt_value(data['attempt'])}")
        if data.get("worker"):
            parts.append(f"worker {fmt_value(data['worker'])}")
        for key in ("reason", "error"):
            if data.get(key):
                parts.append(f"{key}: {fmt_value(data[key])}")
        if data.get("delay"):
            parts.append(f"retry in {fmt_num(data['delay'], '.0f')} s")
        return "state     " + "  ".join(parts)
    if etype == "log":
        level = fmt_value(data.get("level", "info"))
        msg = fmt_value(data.get("message", data.get("raw", "")))
        shown = ("level", "message") if "message" in data else ("level", "raw")
        extra = {k: v for k, v in data.items() if k not in shown}
        if extra:
            msg += "  " + " ".join(f"{k}={fmt_value(v)}" for k, v in extra.items())
        return f"{level:<9} {msg}"
    if etype == "progress":
        ptype = data.get("type")
        if ptype == "epoch":
            return "epoch     " + epoch_line(data)
        if ptype == "eval":
            return "eval      " + eval_line(data)
        if steps and ptype == "step":
            return (f"step      ep {data.get('epoch', '?')} step {data.get('step', '?')}/"
                    f"{data.get('steps_per_epoch', '?')} loss {fmt_num(data.get('loss'))} "
                    f"acc {fmt_pct(data.get('accuracy'))}")
        if ptype not in ("step", "epoch", "eval"):
            return "progress  " + fmt_value(data)
        return None
    if etype == "result":
        return "result    recorded"
    return f"{fmt_value(etype):<9} {fmt_value(data)}"


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    return next((data[k] for k in keys if data.get(k) is not None), None)


def epoch_line(data: Mapping[str, Any]) -> str:
    parts = [f"{data.get('epoch', '?')}/{data.get('epochs', '?')}",
             f"loss {fmt_num(_first(data, 'loss', 'train_loss'))}",
             f"train acc {fmt_pct(_first(data, 'accuracy', 'train_accuracy'))}"]
    test = data.get("test_accuracy")
    if isinstance(test, dict):
        parts.append("test " + " ".join(f"{fmt_angle(a)} {fmt_pct(test[a])}" for a in _angle_sorted(test)))
    elif test is not None:
        parts.append(f"test acc {fmt_pct(test)}")
    if data.get("images_per_second") is not None:
        parts.append(f"{fmt_num(data['images_per_second'], '.0f')} img/s")
    if data.get("lr") is not None:
        parts.append(f"lr {fmt_num(data['lr'], '.3g')}")
    return "  ".join(parts)


def eval_line(data: Mapping[str, Any]) -> str:
    acc = data.get("test_accuracy")
    if isinstance(acc, dict):
        return "  ".join(f"{fmt_angle(a)}: {fmt_pct(acc[a])}" for a in _angle_sorted(acc))
    return f"accuracy {fmt_pct(acc)}"


# ----------------------------------------------------------------------------- following a job


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
        if not isinstance(steps, int) or steps <= 0 or _ratio(step, steps) is None:
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
    """Call ``handle`` for each event of the job (from the start) until it is terminal;
    returns the final record. The record is re-read whenever nothing arrives, so a job whose
    events have expired still ends the wait."""
    cursor = "0"
    while True:
        batch = queue.events.read(job_id, cursor, block_ms=block_ms)
        terminal_seen = False
        for entry_id, event in batch:
            cursor = entry_id
            handle({"id": entry_id, **event})
            if event["type"] == "state" and (event["data"] or {}).get("state") in ("succeeded", "failed",
                                                                                   "cancelled"):
                terminal_seen = True
        if batch and not terminal_seen:
            continue
        record = queue.get(job_id)
        if record is None:
            raise UserError(f"job {job_id} disappeared from Redis while being followed")
        if record.is_terminal:
            for entry_id, event in queue.events.read(job_id, cursor):
                handle({"id": entry_id, **event})
            return record


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
        _emit_json(final.to_dict())
    elif final.state == "succeeded":
        echo("")
        print_results(final)
    else:
        echo(f"job {final.id} {final.state}" + (f": {final.error}" if final.error else ""), err=True)
    if final.state != "succeeded":
        sys.exit(1)


# ----------------------------------------------------------------------------- option types


class NumberList(click.ParamType):
    """Comma-separated numbers, e.g. ``0,15,35`` (``float``) or ``1,3`` (``int``)."""

    def __init__(self, kind: type = float) -> None:
        self.kind = kind
        self.name = "INTS" if kind is int else "NUMBERS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not items or any(v == "" for v in items):
            self.fail(f"{value!r}: expected comma-separated {'integers' if self.kind is int else 'numbers'} "
                      f"such as {'1,3' if self.kind is int else '0,15,35'}", param, ctx)
        try:
            return [self.kind(v) for v in items]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated {'integers' if self.kind is int else 'numbers'} "
                      f"such as {'1,3' if self.kind is int else '0,15,35'}", param, ctx)


class WordList(click.ParamType):
    name = "A,B"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if any(v == "" for v in items):
            self.fail(f"{value!r}: expected a comma-separated list without empty items", param, ctx)
        return items


def parse_model_config(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs -> dict; values parsed as JSON when possible; ``model.key=value``
    nests (per-model overrides)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value, e.g. conv_channels=64",
                                     param_hint="'--model-config'")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if "." in key:
            model, _, sub = key.partition(".")
            nested = out.setdefault(model, {})
            if not isinstance(nested, dict):
                raise click.BadParameter(f"{pair!r}: {model} is set both as a value and per model",
                                         param_hint="'--model-config'")
            nested[sub] = value
        else:
            out[key] = value
    return out


def _put(spec: dict[str, Any], **values: Any) -> dict[str, Any]:
    for key, value in values.items():
        if value is not None and value != ():
            spec[key] = value
    return spec


def data_options(train: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--dataset, [--train-subset,] --test-subset: shared by submit, eval and tune."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--test-subset", type=int, help="Test on the first N images only.")(f)
        if train:
            f = click.option("--train-subset", type=int, help="Train on the first N images only.")(f)
        return click.option("--dataset", type=click.Choice(DATASETS), help="Dataset (default mnist).")(f)
    return decorate


def common_job_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every submitting command shares."""
    options = [
        click.option("--priority", type=click.Choice(PRIORITIES), help="Queue priority (default normal)."),
        click.option("--name", help="A label for the job (shown by list/status)."),
        click.option("--max-retries", type=int, help="Automatic retries after a failure (default 2)."),
        click.option("--max-lost", type=int,
                     help="Times the job may lose its worker (lease expired) and resume (default 10); "
                          "never uses up --max-retries."),
        click.option("--idempotency-key", help="Submitting again with the same key returns the same job."),
        click.option("--follow", "-f", is_flag=True, help="Show progress until the job ends; exit 1 if it fails."),
        click.option("--json", "as_json", is_flag=True, help="Print the job record as JSON."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_submittable(spec: Any, settings: Settings) -> None:
    """What only the operator's settings decide, checked before queueing (SpecError, exit 2):
    the model size limit, and for eval where the checkpoint may come from and, when it is a
    local file this process can read, that it is a safe capsnet_core checkpoint."""
    check_model_size(spec, settings.max_params)
    if isinstance(spec, EvalSpec):
        try:
            check_source_allowed(spec.source, str(settings.artifacts), settings.eval_roots)
            local = local_checkpoint_file(spec.source)
            if local is not None:
                check_checkpoint_file(local)
        except SourceRefused as err:
            raise SpecError(str(err), "source") from None


def submit_spec(app: App, spec: dict[str, Any], idempotency_key: str | None, follow: bool,
                as_json: bool, checked: bool = False) -> None:
    parsed = parse_spec(spec)  # SpecError -> exit 2 before touching Redis
    if not checked:
        check_submittable(parsed, app.settings)
    record = app.queue.submit(parsed, idempotency_key=idempotency_key)
    if as_json and not follow:
        _emit_json(record.to_dict())
        return
    if not as_json:
        echo(record.id)
    if follow:
        wait_and_report(app, record, as_json)


# ----------------------------------------------------------------------------- the group


@click.group(cls=CapsGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--redis-url", envvar="CAPSNET_REDIS_URL", metavar="URL",
              help="Redis of the job queue [env CAPSNET_REDIS_URL; default: the stack `capsctl up` "
                   "started, else redis://127.0.0.1:6379/0].")
@click.option("--redis-prefix", envvar="CAPSNET_REDIS_PREFIX", metavar="PREFIX",
              help="Key prefix in Redis [env CAPSNET_REDIS_PREFIX; default capsnet:].")
@click.option("--state-dir", envvar="CAPSNET_STATE_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Where `up` keeps its state and logs [env CAPSNET_STATE_DIR; default ~/.local/state/capsctl].")
@click.option("--artifacts", envvar="CAPSNET_ARTIFACTS", metavar="PATH|URI",
              help="Checkpoint storage [env CAPSNET_ARTIFACTS].")
@click.option("--ray-address", envvar="RAY_ADDRESS", metavar="HOST:PORT",
              help="Ray cluster for workers [env RAY_ADDRESS; default: a local Ray].")
@click.version_option(package_name="capsctl", prog_name="capsctl")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, redis_prefix: str | None, state_dir: Path | None,
         artifacts: str | None, ray_address: str | None) -> None:
    """Train and evaluate capsule networks (and LeNet5) on rotated images, on a Redis job
    queue served by Ray workers.

    \b
    Quick start on one machine:
      capsctl up                         # Redis + Ray head + a worker, in the background
      capsctl submit capsnet --epochs 3 --eval-angles 0,15,35 --follow
      capsctl list; capsctl results JOB_ID --plot acc.png
      capsctl down
    """
    if redis_prefix is not None and (not redis_prefix or any(c.isspace() for c in redis_prefix)):
        raise click.BadParameter("must be non-empty without spaces", param_hint="'--redis-prefix'")
    overrides: dict[str, Any] = {"redis_url": (redis_url or "").strip() or None, "redis_prefix": redis_prefix,
                                 "ray_address": (ray_address or "").strip() or None,
                                 "artifacts": Path(artifacts).expanduser() if artifacts else None}
    ctx.obj = App({k: v for k, v in overrides.items() if v is not None},
                  state_dir.expanduser() if state_dir else None)


# ----------------------------------------------------------------------------- submit / eval / tune


@main.command()
@click.argument("model", type=click.Choice(MODELS))
@click.option("--gpus", type=int, help="GPUs, one data-parallel rank each (excludes --workers).")
@click.option("--workers", type=int, help="CPU data-parallel ranks (excludes --gpus).")
@click.option("--epochs", type=int, help="Training epochs (default 10).")
@click.option("--batch-size", type=int, help="Global batch size (default 128).")
@click.option("--lr", type=float, help="Learning rate (default 1e-3).")
@click.option("--lr-decay", type=float, help="Per-epoch learning-rate factor (default 1.0).")
@click.option("--augment", metavar="PRESET", help="Training augmentation, e.g. shift2+rot15 (default shift2).")
@click.option("--eval-angles", type=NumberList(float), help="Test rotations in degrees (default 0,15,35).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2",
              help="Test suites: rotation (0-180° in 15° steps + AUC), affine (affine-MNIST or affNIST).")
@click.option("--seed", type=int, help="Random seed (default 0).")
@data_options(train=True)
@click.option("--model-config", multiple=True, metavar="KEY=VALUE",
              help="Model config override (repeatable), e.g. routing_iters=2; values are JSON when they parse.")
@common_job_options
@pass_app
def submit(app: App, model: str, gpus: int | None, workers: int | None, epochs: int | None,
           batch_size: int | None, lr: float | None, lr_decay: float | None, augment: str | None,
           eval_angles: list[float] | None, eval_suites: list[str] | None, dataset: str | None, seed: int | None,
           train_subset: int | None, test_subset: int | None, model_config: tuple[str, ...], priority: str | None,
           name: str | None, max_retries: int | None, max_lost: int | None, idempotency_key: str | None,
           follow: bool, as_json: bool) -> None:
    """Submit a training job for MODEL; prints its id."""
    if gpus is not None and workers is not None:
        raise click.UsageError("--gpus and --workers are mutually exclusive: a GPU job has one rank per GPU")
    spec = _put({"kind": "train", "model": model}, gpus=gpus, workers=workers, epochs=epochs,
                batch_size=batch_size, lr=lr, lr_decay=lr_decay, augment=augment, eval_angles=eval_angles,
                eval_suites=eval_suites, dataset=dataset, seed=seed, train_subset=train_subset,
                test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_spec(app, spec, idempotency_key, follow, as_json)


@main.command("eval")
@click.argument("source", metavar="JOB_ID|CHECKPOINT")
@click.option("--angles", type=NumberList(float), help="Test rotations in degrees (default 0,15,35).")
@click.option("--gpus", type=int, help="0 or 1: evaluate on a GPU the scheduler reserves for it (default 0).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2",
              help="Test suites: rotation (0-180° in 15° steps + AUC), affine (affine-MNIST or affNIST).")
@data_options(train=False)
@common_job_options
@pass_app
def eval_cmd(app: App, source: str, angles: list[float] | None, gpus: int | None,
             eval_suites: list[str] | None, dataset: str | None,
             test_subset: int | None, priority: str | None, name: str | None, max_retries: int | None,
             max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool) -> None:
    """Evaluate a trained job's checkpoint (or a checkpoint path within the artifact storage or
    CAPSNET_EVAL_ROOTS) on rotated test sets."""
    spec = _put({"kind": "eval", "source": source}, angles=angles, gpus=gpus, eval_suites=eval_suites, dataset=dataset,
                test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    check_submittable(parse_spec(spec), app.settings)  # the spec's and the operator's rules, before Redis
    check_eval_source(app, source.strip())
    submit_spec(app, spec, idempotency_key, follow, as_json, checked=True)


def check_eval_source(app: App, source: str) -> None:
    """Refuse an eval that can only fail at run time: the job must exist in Redis, a local path
    on disk. Remote URIs (``s3://`` ...) are left to the worker, which may see other storage."""
    if app.queue.get(source) is not None:
        return
    if JOB_ID_RE.match(source):
        raise SpecUsageError(f"source: no job {source} in Redis (see `capsctl list`)")
    scheme, sep, rest = source.partition("://")
    if sep and scheme != "file":
        return
    path = Path(rest if sep else source).expanduser()
    if not path.exists():
        raise SpecUsageError(f"source: {source} is neither a job id nor an existing checkpoint path")


@main.command()
@click.option("--models", type=WordList(),
              help="Models to compare (default capsnet,lenet5; capsctl models lists them all).")
@click.option("--angles", type=NumberList(float), help="Training rotations, one condition each (default 0,15,35).")
@click.option("--eval-angles", type=NumberList(float), help="Test rotations (default: --angles).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2",
              help="Test suites: rotation (0-180° in 15° steps + AUC), affine (affine-MNIST or affNIST).")
@click.option("--augment", type=WordList(), metavar="P1,P2",
              help="One augmentation preset per training angle (default shift2+rot<angle>).")
@click.option("--lr", type=NumberList(float), help="Learning rates to search, e.g. 1e-3,3e-4.")
@click.option("--routing-iters", type=NumberList(int), help="CapsNet routing iterations to search, e.g. 1,3.")
@click.option("--samples", type=int, help="Samples per grid point (default 1).")
@click.option("--seeds", type=int, help="Seeds per condition, for mean ± std (default 1).")
@click.option("--seed", type=int, help="Base random seed (default 0).")
@click.option("--epochs", type=int, help="Epochs per trial (default 10).")
@click.option("--batch-size", type=int, help="Batch size per trial (default 128).")
@click.option("--gpus-per-trial", type=int, help="GPUs per trial (default 0).")
@click.option("--max-concurrent", type=int, help="Trials at once (default 2).")
@click.option("--asha/--no-asha", default=None, help="Early-stop weak trials with ASHA (default on).")
@data_options(train=True)
@click.option("--model-config", multiple=True, metavar="KEY=VALUE",
              help="Model config override (repeatable; capsnet.KEY=VALUE for one model).")
@common_job_options
@pass_app
def tune(app: App, models: list[str] | None, angles: list[float] | None, eval_angles: list[float] | None,
         eval_suites: list[str] | None,
         augment: list[str] | None, lr: list[float] | None, routing_iters: list[int] | None,
         samples: int | None, seeds: int | None, seed: int | None, epochs: int | None,
         batch_size: int | None, gpus_per_trial: int | None, max_concurrent: int | None,
         asha: bool | None, dataset: str | None, train_subset: int | None, test_subset: int | None,
         model_config: tuple[str, ...], priority: str | None, name: str | None, max_retries: int | None,
         max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool) -> None:
    """Submit a robustness study: models × training rotations (× lr × routing × seeds) on Ray Tune."""
    spec = _put({"kind": "tune"}, models=models, angles=angles, eval_angles=eval_angles, eval_suites=eval_suites,
                augment=augment,
                lr=lr, routing_iters=routing_iters, samples=samples, seeds=seeds, seed=seed, epochs=epochs,
                batch_size=batch_size, gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                asha=asha, dataset=dataset, train_subset=train_subset, test_subset=test_subset,
                priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_spec(app, spec, idempotency_key, follow, as_json)


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json: bool) -> None:
    """The models submit, eval and tune accept: parameters (full size) and what each is."""
    from capsnet_core.models import build_model, count_parameters  # torch: only for this command

    rows = [{"name": name, "parameters": count_parameters(build_model(name)),
             "description": MODEL_DESCRIPTIONS[name]} for name in MODEL_NAMES]
    if as_json:
        _emit_json(rows)
        return
    click.echo(table(("model", "parameters", "description"),
                     [(r["name"], f"{r['parameters']:,}", r["description"]) for r in rows], right=(1,)))


# ----------------------------------------------------------------------------- status / list / logs


def _attempts(record: JobRecord) -> str:
    return f"{record.attempt}/{record.retry_base + record.losses + record.max_retries + 1}"


def _resources(record: JobRecord) -> str:
    if record.kind == "train":
        ranks = record.cpus
        return (f"{record.gpus} GPU(s), {ranks} rank(s)" if record.gpus
                else f"CPU, {ranks} rank(s)")
    return f"{record.gpus} GPU(s), {record.cpus} CPU(s)"


def job_summary(record: JobRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "state": record.state, "kind": record.kind,
            "model": record.model, "priority": record.priority, "gpus": record.gpus, "cpus": record.cpus,
            "attempt": record.attempt, "max_attempts": record.retry_base + record.losses + record.max_retries + 1,
            "progress": record.progress, "progress_text": fmt_progress(record), "created_at": record.created_at,
            "updated_at": record.updated_at, "worker": record.worker, "error": record.error}


def cluster_free(workers: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The cluster's free resources as last published by a live worker (the freshest
    registration: every worker on one Ray cluster reports the same cluster), or None."""
    best: tuple[float, tuple[float, float]] | None = None
    for w in workers:
        free = resource_shape(w.get("available")) if w.get("available") is not None else None
        seen = finite(w.get("seen_at"))
        if free is not None and (best is None or (seen or 0.0) > best[0]):
            best = (seen or 0.0, free)
    return None if best is None else {"gpus": best[1][0], "cpus": best[1][1]}


def waiting_reason(record: JobRecord, workers: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a queued job is not running yet (None for a job in any other state)."""
    if record.state != "queued":
        return None
    if not workers:
        return "no live worker: start one with `capsctl worker` or `capsctl up`"
    free = cluster_free(workers)
    if free is None:
        return "no worker has published the cluster's free resources yet"
    short = shortfall(record.resources, free)
    if short is not None:
        return short
    return (f"fits the free resources ({_g(free['gpus'])} GPU(s), {_g(free['cpus'])} CPU(s)): next in line "
            f"unless a job of higher priority or older is admitted first")


def print_job(record: JobRecord, waiting: str | None = None) -> None:
    rows: list[tuple[str, Any]] = [
        ("job", record.id + (f"  ({record.name})" if record.name else "")),
        ("state", record.state + ("  (cancel requested)" if record.cancel_requested and not record.is_terminal
                                  else "")),
        ("kind", f"{record.kind}  model {record.model or '-'}  priority {record.priority}"),
        ("resources", _resources(record)),
        ("attempt", f"{_attempts(record)}  ({record.retries_left} retries left, "
                    f"{record.losses}/{record.max_lost} lost workers)"),
        ("progress", fmt_progress(record)),
    ]
    p = record.progress or {}
    if p.get("type") in ("step", "epoch"):
        rows.append(("", f"loss {fmt_num(p.get('loss'))}  acc {fmt_pct(p.get('accuracy'))}  "
                         f"{fmt_num(p.get('images_per_second'), '.0f')} img/s"))
    if waiting:
        rows.append(("waiting", waiting))
    rows.append(("worker", record.worker or "-"))
    if record.state == "running" and record.lease_expires_at:
        rows.append(("lease", f"expires {fmt_time(record.lease_expires_at)}  heartbeat "
                              f"{fmt_time(record.heartbeat_at)}"))
    if record.state == "retrying" and record.not_before:
        rows.append(("next try", fmt_time(record.not_before)))
    rows.append(("checkpoint", record.checkpoint or "-"))
    if record.error:
        rows.append(("error", record.error))
    rows += [("created", fmt_time(record.created_at)), ("started", fmt_time(record.started_at)),
             ("finished", fmt_time(record.finished_at))]
    rows.append(("spec", json.dumps(json_ready(record.spec), sort_keys=True)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        echo(f"{key:<{width}}  {value}")
    if record.transitions:
        echo("\ntransitions:")
        trows = []
        for t in record.transitions:
            if "invalid" in t:  # an entry that is not a transition object (see JobRecord.from_hash)
                trows.append(("-", "", "<unreadable>", "", fmt_value(t["invalid"])))
                continue
            detail = "  ".join(f"{k} {fmt_value(t[k])}" for k in ("reason", "worker", "error") if t.get(k))
            trows.append((fmt_time(t.get("at")), fmt_value(t.get("from") or ""), fmt_value(t.get("state", "?")),
                          fmt_value(t.get("attempt", "")), detail))
        echo(_indent(table(("AT", "FROM", "TO", "ATTEMPT", "DETAIL"), trows, right=(3,))))


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def cluster_info(app: App) -> dict[str, Any]:
    queue = app.queue
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    by_priority: dict[str, dict[str, int]] = {s: dict.fromkeys(PRIORITIES, 0) for s in STATES}
    for (state, priority), n in queue.state_counts().items():
        counts[state] = counts.get(state, 0) + n
        by_priority.setdefault(state, {})[priority] = n
    capacity = queue.cluster_capacity()
    return {
        "redis_url": stack_mod.redact_url(app.settings.redis_url),
        "workers": queue.workers(),
        "cluster": {k: capacity[k] for k in ("workers", "gpus", "cpus", "max_gpus", "max_cpus")},
        "jobs": counts,
        "jobs_by_priority": by_priority,
        "queue_depth": queue.queue_depth(),
        "dead_letters": queue.dead_letter_count(),
    }


def print_workers(workers: Sequence[Mapping[str, Any]]) -> None:
    rows = []
    for w in workers:
        shape = worker_resources(w)  # None: unreadable, counted in no total
        free = w.get("available")
        free_shape = resource_shape(free)
        rows.append((fmt_value(w.get("id")), fmt_value(w.get("hostname", "-")),
                     "invalid" if shape is None else _g(shape[0]), "invalid" if shape is None else _g(shape[1]),
                     "-" if not free else "invalid" if free_shape is None else
                     f"{_g(free_shape[0])}/{_g(free_shape[1])}",
                     fmt_value(w.get("current_job") or "-"), fmt_value(w.get("metrics_url") or "-"),
                     fmt_age(w.get("seen_at"))))
    echo(_indent(table(("ID", "HOST", "GPUS", "CPUS", "FREE G/C", "JOB", "METRICS", "SEEN"), rows,
                             right=(2, 3))))


@main.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def status(app: App, job_id: str | None, as_json: bool) -> None:
    """One job in detail, or (without JOB_ID) the cluster: workers, capacity, jobs by state."""
    if job_id:
        record = app.job(job_id)
        waiting = waiting_reason(record, app.queue.workers()) if record.state == "queued" else None
        if as_json:
            _emit_json({**record.to_dict(), **({"waiting": waiting} if waiting else {})})
        else:
            print_job(record, waiting)
        return
    info = cluster_info(app)
    if as_json:
        _emit_json(info)
        return
    c = info["cluster"]
    echo(f"Redis    {info['redis_url']}")
    echo(f"Cluster  {c['workers']} worker(s), {_g(c['gpus'])} GPU(s), {_g(c['cpus'])} CPU(s)")
    if info["workers"]:
        print_workers(info["workers"])
    else:
        echo("  no live workers: start one with `capsctl worker` or `capsctl up`")
    echo("Jobs     " + "  ".join(f"{s} {n}" for s, n in info["jobs"].items()))
    if info["dead_letters"]:
        echo(f"Dead letters: {info['dead_letters']} (capsctl dead-letters)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def workers(app: App, as_json: bool) -> None:
    """Live workers and the cluster's GPU/CPU totals."""
    queue = app.queue
    found = queue.workers()
    capacity = queue.cluster_capacity()
    if as_json:
        _emit_json({"workers": found, "cluster": {k: capacity[k] for k in
                                                  ("workers", "gpus", "cpus", "max_gpus", "max_cpus")}})
        return
    if not found:
        echo("no live workers: start one with `capsctl worker` or `capsctl up`")
        return
    print_workers(found)
    echo(f"total: {capacity['workers']} worker(s), {_g(capacity['gpus'])} GPU(s), "
               f"{_g(capacity['cpus'])} CPU(s)")


@main.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="Newest N jobs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def list_cmd(app: App, state: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    records = app.queue.list(state=state, limit=limit)
    if as_json:
        _emit_json([job_summary(r) for r in records])
        return
    if not records:
        echo("no jobs" + (f" in state {state}" if state else ""))
        return
    now = time.time()
    rows = [(r.id, r.state, r.kind, r.model or "-", r.gpus, _attempts(r), fmt_progress(r), fmt_age(r.created_at, now),
             r.worker or "-") for r in records]
    echo(table(("ID", "STATE", "KIND", "MODEL", "GPUS", "ATTEMPT", "PROGRESS", "AGE", "WORKER"), rows,
                     right=(4, 7)))


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option("--steps", is_flag=True, help="Include per-step progress events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line.")
@pass_app
def logs(app: App, job_id: str, follow: bool, steps: bool, as_json: bool) -> None:
    """A job's events: state changes, log lines, epoch summaries."""
    record = app.job(job_id)  # unknown id -> one-line error
    if record.kind == "tune" and not as_json:
        _tune_logs(app, record, follow)
        return
    last_progress: list[Any] = [None]

    def show(event: dict[str, Any]) -> None:
        if as_json:
            echo(json.dumps(json_ready({"id": event["id"], "type": event["type"], "at": event["at"],
                                        "data": event["data"]}), sort_keys=True, allow_nan=False))
            return
        if event["type"] == "progress":
            if event["data"] == last_progress[0]:  # the same progress published twice
                return
            last_progress[0] = event["data"]
        line = describe_event(event, steps=steps)
        if line is not None:
            echo(f"{fmt_time(event['at'])}  {line}")

    if follow:
        try:
            follow_events(app.queue, job_id, show)
        except KeyboardInterrupt:
            sys.exit(130)
        return
    cursor = "0"
    while True:
        batch = app.queue.events.read(job_id, cursor, count=1000)
        for entry_id, event in batch:
            cursor = entry_id
            show({"id": entry_id, **event})
        if len(batch) < 1000:
            break


def _tune_logs(app: App, record: JobRecord, follow: bool) -> None:
    """``logs`` of a tune job: trial events in words and the trials' running summary."""
    view = job_view(record, tty=follow and sys.stdout.isatty(), stamp=lambda at: f"{fmt_time(at)}  ")
    try:
        if follow:
            follow_events(app.queue, record.id, view.handle)
            return
        cursor = "0"
        while True:
            batch = app.queue.events.read(record.id, cursor, count=1000)
            for entry_id, event in batch:
                cursor = entry_id
                view.handle({"id": entry_id, **event})
            if len(batch) < 1000:
                break
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        view.close()


@main.command()
@click.argument("job_id")
@pass_app
def cancel(app: App, job_id: str) -> None:
    """Cancel a job (a running one stops at its next step)."""
    outcome = app.queue.cancel(job_id)
    if outcome == "cancelled":
        echo(f"cancelled {job_id}")
    else:
        echo(f"cancel requested for {job_id}: it is running; its worker stops it shortly")


@main.command()
@click.argument("job_id")
@pass_app
def retry(app: App, job_id: str) -> None:
    """Queue a failed or cancelled job again (with a fresh retry budget)."""
    record = app.queue.retry(job_id)  # JobNotFound / JobStateError become one-line errors
    echo(f"requeued {record.id} (state {record.state}, {record.max_retries} automatic retries)")


@main.command("dead-letters")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def dead_letters(app: App, limit: int, as_json: bool) -> None:
    """Jobs (or junk) the queue set aside, newest first, with the reason."""
    entries = app.queue.dead_letters(limit)
    if as_json:
        _emit_json(entries)
        return
    if not entries:
        echo("no dead letters")
        return
    rows = [(fmt_time(e.get("at")), fmt_value(e.get("job_id", "-")), fmt_value(e.get("source", "-")),
             fmt_value(e.get("reason", e.get("raw", "")))) for e in entries]
    echo(table(("AT", "JOB", "SOURCE", "REASON"), rows))


class Duration(click.ParamType):
    """An age such as ``7d``, ``12h``, ``30m`` or ``90s`` (a bare number is days), in seconds."""

    name = "AGE"
    UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:]) if text else None
        try:
            amount = float(text[:-1] if unit else text)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or amount < 0:
            self.fail(f"{value!r}: expected an age such as 7d, 12h, 30m or 90s", param, ctx)
        return amount * (unit or 86400.0)


PRUNE_BATCH = 500  # jobs per Lua call: each call holds Redis for a few ms only


@main.command()
@click.option("--older-than", type=Duration(), metavar="AGE",
              help="Remove jobs that finished longer ago than this, e.g. 7d, 12h [default: "
                   "CAPSNET_RETENTION_DAYS, 30d].")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def prune(app: App, older_than: float | None, dry_run: bool, as_json: bool) -> None:
    """Remove finished jobs (record, events, index entries, idempotency key) older than an age.

    Workers do this on their own in small batches; queued, running and retrying jobs are never
    touched."""
    if older_than is None:
        if app.settings.retention_days <= 0:
            raise click.UsageError("CAPSNET_RETENTION_DAYS is 0 (keep forever): give --older-than")
        older_than = app.settings.retention_days * 86400.0
    queue = app.queue
    if dry_run:
        count = queue.count_prunable(older_than)
    else:
        count = 0
        while True:
            batch = queue.prune(older_than, limit=PRUNE_BATCH)
            count += len(batch.job_ids)
            if not batch.more:
                break
    if as_json:
        _emit_json({"pruned": 0 if dry_run else count, "would_prune": count if dry_run else None,
                    "dry_run": dry_run, "older_than_seconds": older_than})
        return
    age = fmt_age(time.time() - older_than)
    click.echo(f"{'would remove' if dry_run else 'removed'} {count} finished job(s) older than {age}")


# ----------------------------------------------------------------------------- results


def _per_class_table(per_class: Mapping[str, Any]) -> str:
    angles = _angle_sorted(per_class)
    columns = {a: per_class[a] if isinstance(per_class[a], list) else [] for a in angles}
    n = max((len(col) for col in columns.values()), default=0)
    rows = []
    for c in range(n):
        rows.append([str(c)] + [fmt_pct(columns[a][c]).rstrip("%") if c < len(columns[a]) else "-"
                                for a in angles])
    return table(["class", *(fmt_angle(a) for a in angles)], rows, right=range(len(angles) + 1))


def print_results(record: JobRecord) -> None:
    result = record.result if isinstance(record.result, dict) else {}
    echo(f"{record.id}  {record.kind} {record.model or ''}  {record.state}".rstrip())
    rot = result.get("rotation_accuracy")
    if isinstance(rot, dict) and rot:
        echo("\nAccuracy by test rotation")
        rows = [(fmt_angle(a), fmt_pct(rot[a])) for a in _angle_sorted(rot)]
        echo(_indent(table(("angle", "accuracy"), rows, right=(0, 1))))
    suites = result.get("suite_accuracy")
    if isinstance(suites, dict) and suites:
        echo("\nTest suites")
        echo(_indent(table(("suite", "value"), [(k, _suite_value(k, v)) for k, v in suites.items()], right=(1,))))
    per_class = result.get("per_class")
    if isinstance(per_class, dict) and per_class:
        echo("\nPer-class accuracy (%), rows = classes, columns = test rotation")
        echo(_indent(_per_class_table(per_class)))
    history = result.get("history")
    if isinstance(history, list) and history:
        echo("\nTraining curve")
        rows = []
        for h in history:
            if not isinstance(h, dict):
                continue
            rows.append((fmt_value(h.get("epoch", "-")), fmt_num(h.get("train_loss")), fmt_pct(h.get("train_accuracy")),
                         fmt_pct(h.get("test_accuracy")) if not isinstance(h.get("test_accuracy"), dict)
                         else " ".join(fmt_pct(v) for v in h["test_accuracy"].values()),
                         fmt_num(h.get("images_per_second"), ".0f"), fmt_num(h.get("lr"), ".3g"),
                         fmt_num(h.get("epoch_seconds"), ".1f")))
        echo(_indent(table(("epoch", "loss", "train acc", "test acc", "img/s", "lr", "seconds"), rows,
                                 right=range(7))))
    matrix = _tune_models(result)
    if isinstance(matrix, dict):
        for model, m in matrix.items():
            if not isinstance(m, dict):
                continue
            echo(f"\n{model}: accuracy (%) mean ± std; rows = training augmentation, columns = test rotation")
            cols = m.get("cols") if isinstance(m.get("cols"), list) else []
            mean, std = m.get("mean") or [], m.get("std") or []
            best_by_col = m.get("best_by_col") if isinstance(m.get("best_by_col"), dict) else {}
            rows = []
            for i, label in enumerate(m.get("rows") if isinstance(m.get("rows"), list) else []):
                cells = []
                for j, col in enumerate(cols):
                    mu = _cell(mean, i, j)
                    sd = _cell(std, i, j)
                    mark = " *" if best_by_col.get(printable(col)) == label else ""
                    cells.append("-" if mu is None else f"{100 * mu:.2f}" + (f" ± {100 * sd:.2f}" if sd else "") + mark)
                rows.append([fmt_value(label), *cells])
            echo(_indent(table(["augment", *(fmt_angle(c) for c in cols)], rows,
                                     right=range(1, len(cols) + 1))))
            echo("  * best in its column")
            if "rotation_auc" in cols:
                echo("  rotation_auc: area under accuracy against angle over 0-180° / 180, shown x 100")
            if m.get("best_checkpoint"):
                echo(f"  best checkpoint: {m['best_checkpoint']}  (capsctl eval <it> --angles ...)")
    extra = {k: v for k, v in result.items()
             if k in ("world_size", "device", "model") and v is not None}
    if isinstance(result.get("trials"), list):
        extra["trials"] = len(result["trials"])
    if extra:
        echo("\n" + "  ".join(f"{k} {fmt_value(v)}"
                                    for k, v in extra.items()))
    if matrix is not None:  # a tune job: its best checkpoint per model is named above; no job checkpoint
        artifacts = result.get("artifacts") if isinstance(result.get("artifacts"), dict) else {}
        if artifacts.get("csv"):
            echo(f"Matrix CSV: {printable(artifacts['csv'])}")
        return
    checkpoint = result.get("checkpoint") or record.checkpoint
    echo(f"\nCheckpoint: {checkpoint or '-'}")


SUITE_LABELS = {"rotation_auc": "rotation AUC 0-180° (trapezoid / 180)",
                "affine-mnist": "affine-MNIST accuracy (generated, seed 0)",
                "affnist": "affNIST accuracy (genuine, re-centred 28x28)"}


def _suite_value(key: str, value: Any) -> str:
    """A suite summary: the AUC as a fraction, accuracies in %, each with what it is."""
    text = fmt_num(value, ".3f") if key == "rotation_auc" else fmt_pct(value)
    return f"{text}  {SUITE_LABELS.get(key, '')}".rstrip()


def _tune_models(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The per-model robustness matrices of a tune result (``result["models"]``)."""
    if result.get("kind") == "tune" and isinstance(result.get("models"), dict):
        return result["models"]
    return None


def _cell(grid: Any, i: int, j: int) -> float | None:
    try:
        v = float(grid[i][j])
    except (TypeError, ValueError, IndexError, KeyError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def write_plots(record: JobRecord, path: Path) -> list[Path]:
    """accuracy-vs-angle for train/eval jobs; one heatmap per model for tune jobs."""
    from capsnet_core import plots

    result = record.result if isinstance(record.result, dict) else {}
    matrix = _tune_models(result)
    if isinstance(matrix, dict) and matrix:
        out = []
        for model, m in matrix.items():
            target = path if len(matrix) == 1 else path.with_name(f"{path.stem}-{model}{path.suffix or '.png'}")
            grid = [[_cell(m.get("mean"), i, j) or 0.0 for j in range(len(m.get("cols") or []))]
                    for i in range(len(m.get("rows") or []))]
            out.append(plots.plot_robustness_heatmap(grid, [str(r) for r in m.get("rows") or []],
                                                     [str(c) for c in m.get("cols") or []], target,
                                                     title=f"{model}: accuracy by training augmentation"))
        return out
    rot = result.get("rotation_accuracy")
    if not isinstance(rot, dict) or not rot:
        raise UserError(f"job {record.id} has no accuracy by angle to plot")
    label = f"{record.model or result.get('model') or record.kind} ({record.id})"
    auc = (result.get("suite_accuracy") or {}).get("rotation_auc") if isinstance(result.get("suite_accuracy"), dict) \
        else None
    if isinstance(auc, int | float):
        label += f", AUC {auc:.3f}"
    return [plots.plot_accuracy_vs_angle({label: rot}, path,
                                         title=f"{record.model or record.kind}: accuracy on rotated test images")]


@main.command()
@click.argument("job_id")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also write accuracy vs angle (tune: a heatmap per model) as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def results(app: App, job_id: str, plot: Path | None, as_json: bool) -> None:
    """Accuracy per test angle, per class, the training curve and the checkpoint of a finished job."""
    record = app.job(job_id)
    if record.result is None:
        raise UserError(f"job {job_id} has no results yet (state {record.state})"
                        + (f": {record.error}" if record.error else ""))
    written = write_plots(record, plot) if plot else []
    if as_json:
        result = record.result if isinstance(record.result, dict) else {}
        _emit_json({"id": record.id, "kind": record.kind, "model": record.model, "state": record.state,
                    "result": record.result, "checkpoint": result.get("checkpoint") or record.checkpoint,
                    "plots": [str(p) for p in written]})
        return
    print_results(record)
    for p in written:
        echo(f"Plot: {p}")


@main.command()
@click.argument("job_ids", metavar="JOB [JOB ...]", nargs=-1, required=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also draw every run's accuracy against test angle on one plot (± std bands for seeds).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (accuracies as fractions).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: one row per run, acc_<angle> and std_<angle> columns.")
@pass_app
def compare(app: App, job_ids: tuple[str, ...], plot: Path | None, as_json: bool, as_csv: bool) -> None:
    """Finished train, eval and tune jobs side by side: accuracy per test angle (tune: one row per
    model × augmentation, mean ± std over seeds), parameters, epochs; angles are the union of the jobs'."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv are mutually exclusive")
    records = [app.job(job_id) for job_id in dict.fromkeys(job_ids)]
    try:
        comparison = compare_mod.compare(records, app.queue.get)
        written = compare_mod.plot(comparison, plot) if plot else None
    except compare_mod.CompareError as err:
        raise UserError(str(err)) from None
    if as_json:
        _emit_json({**comparison.to_dict(), "plot": str(written) if written else None})
        return
    if as_csv:
        echo(compare_mod.to_csv(comparison), nl=False)
        return
    headers, rows, right = compare_mod.table_rows(comparison)
    echo(table(headers, rows, right=right))
    echo(f"\n{compare_mod.ACCURACY_NOTE}")
    if written:
        echo(f"Plot: {written}")


# ----------------------------------------------------------------------------- worker / up / down


@main.command()
@click.option("--worker-id", help="Worker id (default <hostname>-<pid>).")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Prometheus /metrics port (0 = any free port) [env CAPSNET_METRICS_PORT; default 9310].")
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs of the local Ray it starts (no RAY_ADDRESS).")
@click.option("--max-jobs", type=click.IntRange(1), help="Exit after this many jobs.")
@click.option("--idle-exit", type=click.FloatRange(0), metavar="SECONDS", help="Exit after this long without work.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@pass_app
def worker(app: App, worker_id: str | None, metrics_port: int | None, num_cpus: int | None, max_jobs: int | None,
           idle_exit: float | None, log_level: str) -> None:
    """Serve the job queue in the foreground (SIGTERM/Ctrl-C: finish gracefully)."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .redis_retry import describe, is_transient
    from .worker import Worker

    try:  # fail fast, in one line, on what waiting cannot fix (credentials, database number, protocol)
        redis_client(app.settings, socket_connect_timeout=3).ping()
    except ValueError as err:  # a malformed URL
        raise UserError(f"CAPSNET_REDIS_URL: {err}", exit_code=2) from None
    except (redis.RedisError, OSError) as err:
        if not is_transient(err):
            raise UserError(redis_failure_message(app.settings.redis_url, err)) from None
        # Down or restarting: a worker outlives Redis outages, and waits for it at start-up too.
        logging.getLogger("capsctl.worker").warning("Redis at %s unavailable (%s): waiting for it",
                                                    stack_mod.redact_url(app.settings.redis_url), describe(err))

    try:
        Worker(app.settings, worker_id=worker_id, metrics_port=metrics_port, num_cpus=num_cpus).run(
            max_jobs=max_jobs, idle_exit_s=idle_exit)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        port = app.settings.metrics_port if metrics_port is None else metrics_port
        raise UserError(f"metrics port {port} is already in use: pass --metrics-port 0 (any free port) "
                        f"or another port") from None


def _print_stack(record: Mapping[str, Any]) -> None:
    r, ray = record.get("redis") or {}, record.get("ray") or {}
    started = "started by up" if r.get("started") else "already running, used as is"
    echo(f"Redis    {stack_mod.redact_url(r.get('url', '?'))}  ({started}"
               + (f", pid {r.get('pid')}, data {r.get('dir')}, log {r.get('log')}" if r.get("started") else "")
               + ")")
    if ray.get("started"):
        echo(f"Ray      {ray.get('address')}  (head started by up, {ray.get('num_cpus')} CPUs, "
                   f"temp dir {ray.get('temp_dir')}, log {ray.get('log')})")
    else:
        echo(f"Ray      {ray.get('address')}  (RAY_ADDRESS, not managed by up)")
    for w in record.get("workers") or []:
        echo(f"worker   {w.get('id')}  pid {w.get('pid')}  log {w.get('log')}")
        echo(f"metrics  {w.get('metrics_url') or '-'}")
    if record.get("env_file"):
        echo(f"env      {record['env_file']}  (capsctl reads it; other tools: set -a; . {record['env_file']})")


@main.command()
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs for the local Ray head (default: all).")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="First worker's /metrics port (default 9310, or a free one when taken).")
@click.option("--workers", "num_workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes to start.")
@click.option("--timeout", type=click.FloatRange(1), default=180, show_default=True,
              help="Seconds to wait for the workers to register.")
@click.option("--json", "as_json", is_flag=True, help="Print the stack record as JSON.")
@pass_app
def up(app: App, num_cpus: int | None, metrics_port: int | None, num_workers: int, timeout: float,
       as_json: bool) -> None:
    """Start a one-machine stack: Redis (unless one answers), a Ray head (unless RAY_ADDRESS),
    and worker(s), in the background; `capsctl down` stops them."""
    settings = app.settings
    say = (lambda _m: None) if as_json else (lambda m: echo(f"... {m}", err=True))
    record = stack_mod.up(settings, num_cpus=num_cpus, metrics_port=metrics_port, workers=num_workers,
                          timeout=timeout, log=say)
    if as_json:
        _emit_json(record)
        return
    if record.get("already_up"):
        echo(f"already up (state dir {settings.state_dir}; `capsctl down` stops it)")
    else:
        echo(f"up (state dir {settings.state_dir})")
    _print_stack(record)


@main.command()
@click.option("--grace", type=click.FloatRange(0), default=20, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@pass_app
def down(app: App, grace: float) -> None:
    """Stop what `capsctl up` started (never a Redis or Ray it did not start)."""
    settings = app.settings
    record = stack_mod.down(settings, grace=grace, log=lambda m: echo(f"... {m}", err=True))
    if record is None:
        echo(f"nothing to stop: no stack recorded in {settings.state_dir}")
        return
    stopped = record.get("stopped") or {}
    echo(f"down: stopped {len(stopped.get('workers') or [])} worker process(es), "
               f"{len(stopped.get('ray') or [])} Ray process(es), "
               f"{'redis-server' if stopped.get('redis') else 'no Redis'}")


if __name__ == "__main__":  # pragma: no cover
    main()
