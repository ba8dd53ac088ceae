"""Running the service: ``worker`` (serve the queue in the foreground), and ``up``/``down`` (a
one-machine stack in the background), apart from the job commands as rq keeps rq/cli/workers.py."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import redis

from services.cli.helpers import App, UserError, command, echo, emit_json, pass_app, redis_failure_message
from services.queue.connection import redis_client
from services.queue.redis_health import EvictionPolicyRefused
from services.stack import stack as stack_mod
from services.stack.record import load_env


@command()
@click.option("--worker-id", help="Worker id (default <hostname>-<pid>).")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Prometheus /metrics port (0 = any free port) [env CAPSNET_METRICS_PORT; default 9310].")
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs of the local Ray it starts (no RAY_ADDRESS).")
@click.option("--max-jobs", type=click.IntRange(1), help="Exit after this many jobs.")
@click.option("--idle-exit", type=click.FloatRange(0), metavar="SECONDS", help="Exit after this long without work.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="The worker's log verbosity on stderr.")
@pass_app
def worker(app: App, worker_id: str | None, metrics_port: int | None, num_cpus: int | None, max_jobs: int | None,
           idle_exit: float | None, log_level: str) -> None:
    """Serve the job queue in the foreground (SIGTERM/Ctrl-C: finish gracefully)."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.queue.redis_retry import describe, is_transient
    from services.worker.worker import Worker

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

    # Joining the Ray cluster `capsctl up` started: Ray itself reads its auth mode from the process
    # environment, which the stack's env file (read for capsctl's own settings) does not set.
    stack_auth = load_env(Path(app.settings.state_dir).expanduser()).get("RAY_AUTH_MODE")
    if stack_auth and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = stack_auth
    try:
        Worker(app.settings, worker_id=worker_id, metrics_port=metrics_port, num_cpus=num_cpus).run(
            max_jobs=max_jobs, idle_exit_s=idle_exit)
    except EvictionPolicyRefused as err:
        raise UserError(str(err)) from None
    except ConnectionError as err:  # ray.init could not join the cluster
        raise UserError(f"cannot join the Ray cluster at {app.settings.ray_address or 'a local Ray'}: "
                        f"{str(err).splitlines()[0]} (check RAY_ADDRESS and RAY_AUTH_MODE)") from None
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
               + (f", maxmemory-policy {r['maxmemory_policy']}" if r.get("maxmemory_policy") else "")
               + ")")
    for warning in r.get("warnings") or []:
        echo(f"WARNING  {warning}", err=True)
    if ray.get("started"):
        echo(f"Ray      {ray.get('address')}  (head started by up, {ray.get('num_cpus')} CPUs, "
                   f"temp dir {ray.get('temp_dir')}, log {ray.get('log')})")
        if ray.get("dashboard_url"):
            echo(f"Ray dashboard {ray['dashboard_url']}")
    else:
        echo(f"Ray      {ray.get('address')}  (RAY_ADDRESS, not managed by up)")
    for w in record.get("workers") or []:
        echo(f"worker   {w.get('id')}  pid {w.get('pid')}  log {w.get('log')}")
        echo(f"metrics  {w.get('metrics_url') or '-'}")
    if record.get("prometheus_config"):
        echo(f"Prometheus for this stack: prometheus --config.file={record['prometheus_config']}")
    if record.get("env_file"):
        echo(f"env      {record['env_file']}  (capsctl reads it; other tools: set -a; . {record['env_file']})")


@command()
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs for the local Ray head (default: all).")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="First worker's /metrics port (default 9310, or a free one when taken).")
@click.option("--workers", "num_workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes to start.")
@click.option("--timeout", type=click.FloatRange(1), default=180, show_default=True,
              help="Seconds to wait for the workers to register.")
@click.option("--node-ip-address", default="127.0.0.1", show_default=True,
              help="Address the Ray head listens on: this machine's cluster address lets other nodes "
                   "join (the default binds Ray to loopback only).")
@click.option("--json", "as_json", is_flag=True, help="Print the stack record as JSON.")
@pass_app
def up(app: App, num_cpus: int | None, metrics_port: int | None, num_workers: int, timeout: float,
       node_ip_address: str, as_json: bool) -> None:
    """Start a one-machine stack: Redis (unless one answers), a Ray head (unless RAY_ADDRESS),
    and worker(s), in the background; `capsctl down` stops them."""
    settings = app.settings
    say = (lambda _m: None) if as_json else (lambda m: echo(f"... {m}", err=True))
    record = stack_mod.up(settings, num_cpus=num_cpus, metrics_port=metrics_port, workers=num_workers,
                          timeout=timeout, log=say, node_ip_address=node_ip_address)
    if as_json:
        emit_json(record)
        return
    if record.get("already_up"):
        echo(f"already up (state dir {settings.state_dir}; `capsctl down` stops it)")
    else:
        echo(f"up (state dir {settings.state_dir})")
    _print_stack(record)


@command()
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

