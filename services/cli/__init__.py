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

The package: ``helpers`` (errors, the App, the click classes), ``options`` (option types and
shared options), ``render`` (tables and lines), ``follow`` (following a running job),
``jobfiles`` (``-f`` job files), ``dry_run`` (``--dry-run`` reports),
``commands_jobs`` (submit, eval, tune, schema, models, results, compare), ``commands_admin`` (status,
workers, list, logs, cancel, retry, dead-letters, prune) and ``commands_stack`` (worker, up, down).
This module defines the ``capsctl`` group itself and adds the commands to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from services.cli import commands_admin, commands_artifacts, commands_jobs, commands_stack
from services.cli.helpers import CONTEXT_SETTINGS, App, CapsGroup


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
                                 "artifacts": artifacts.strip() or None if artifacts else None}
    ctx.obj = App({k: v for k, v in overrides.items() if v is not None},
                  state_dir.expanduser() if state_dir else None)



for _command in (commands_jobs.submit, commands_jobs.eval_cmd, commands_jobs.tune, commands_jobs.models_cmd, commands_jobs.schema_cmd,
                 commands_jobs.results, commands_jobs.compare, commands_artifacts.artifacts,
                 commands_admin.status, commands_admin.workers, commands_admin.list_cmd, commands_admin.logs,
                 commands_admin.cancel, commands_admin.retry, commands_admin.dead_letters, commands_admin.prune,
                 commands_stack.worker, commands_stack.up, commands_stack.down):
    main.add_command(_command)

__all__ = ["main"]
