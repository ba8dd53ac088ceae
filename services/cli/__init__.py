"""``capsctl``: submit and watch capsule-network jobs (one click group, in the style of rq/flask).

This module defines the ``capsctl`` group (settings precedence, exit codes) and adds the
commands of ``commands_jobs``, ``commands_admin`` and ``commands_stack`` to it; docs/architecture.md
*The command line* says how settings are found and what each exit code means.
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
