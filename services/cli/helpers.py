"""What every capsctl command shares: one-line user errors with their exit codes, the click
group and command classes that produce them, the per-invocation ``App`` (settings and queue),
and printing that never fails on what Redis held."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import click
import redis

from services.config import Settings, SettingsError
from services.queue.connection import redis_client
from services.queue.errors import CapacityError, IdempotencyConflict, JobNotFound, JobStateError, QueueError
from services.queue.job import JobRecord
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.parsing import json_ready, printable
from services.queue.replication import NotReplicated
from services.queue.selection import AmbiguousJobId
from services.spec.errors import SpecError
from services.stack import stack as stack_mod
from services.stack.record import user_settings

CONTEXT_SETTINGS = {"auto_envvar_prefix": "CAPSCTL", "help_option_names": ["-h", "--help"],
                    "max_content_width": 110}

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
            raise SpecUsageError(in_flag_terms(str(err), ctx)) from None
        except (CapacityError, IdempotencyConflict) as err:
            raise SpecUsageError(str(err)) from None
        except SettingsError as err:
            raise UserError(str(err), exit_code=2) from None
        except NotReplicated as err:
            records = err.reply if isinstance(err.reply, list) else []
            ids = ", ".join(r.id for r in records if hasattr(r, "id"))
            raise UserError(f"submitted {ids or 'the job'}, not yet replicated ({err}); it may be lost if the primary "
                            f"fails now: check with `capsctl status`") from None
        except AmbiguousJobId as err:  # the user's input names several jobs: usage, as a bad flag is
            raise UserError(str(err), exit_code=2) from None
        except JobNotFound as err:
            raise UserError(f"{err} (see `capsctl list`)" if "capsctl list" not in str(err) else str(err)) from None
        except (JobStateError, QueueError) as err:
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

# Spec fields whose flag is not simply --field-name.
FIELD_PARAMS = {"model_overrides": "model_config"}


def in_flag_terms(message: str, ctx: click.Context) -> str:
    """``batch_size: must be ...`` as ``--batch-size: must be ...`` when the command has that flag:
    the user sees what they typed, not the spec's field name."""
    field, sep, rest = message.partition(": ")
    if not sep or not field.replace("_", "").isalpha():
        return message
    wanted = FIELD_PARAMS.get(field, field)
    leaf = ctx
    while leaf.invoked_subcommand is not None and leaf.command is not None:  # the group: find the subcommand
        command = getattr(leaf.command, "commands", {}).get(leaf.invoked_subcommand)
        if command is None:
            break
        leaf = click.Context(command, parent=leaf, info_name=leaf.invoked_subcommand)
    for param in leaf.command.params:
        if param.name == wanted and isinstance(param, click.Option) and param.opts:
            return f"{max(param.opts, key=len)}: {rest}"
    return message


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
                self._settings = user_settings(self._overrides, self._state_dir)
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
            self._queue = JobQueue(client, Keys(settings.redis_prefix), lease_seconds=settings.lease_seconds,
                                   wait_replicas=settings.redis_wait, wait_timeout_ms=settings.redis_wait_timeout_ms)
        return self._queue

    def job(self, job_id: str) -> JobRecord:
        """The job a full id or a unique prefix names (one-line error when none or several)."""
        try:
            job_id = self.queue.resolve(job_id)
        except JobNotFound:
            raise UserError(f"no job {job_id} (see `capsctl list`)") from None
        record = self.queue.get(job_id)
        if record is None:
            raise UserError(f"no job {job_id} (see `capsctl list`)")
        return record

pass_app = click.make_pass_decorator(App)

# A capsctl command (for modules that define commands before the group adds them).
command = functools.partial(click.command, cls=CapsCommand)

def echo(message: Any = "", err: bool = False, nl: bool = True) -> None:
    """``click.echo`` of printable text: whatever Redis held (bytes that are not UTF-8, lone
    surrogates from JSON) is escaped rather than making the write fail."""
    click.echo(printable(message), err=err, nl=nl)

def emit_json(obj: Any) -> None:
    """``--json`` output: strict JSON (NaN/inf as null), sorted keys, printable text."""
    echo(json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False))
