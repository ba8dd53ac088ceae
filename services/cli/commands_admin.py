"""The commands that read and manage the queue: status, workers, list, logs, cancel, retry,
dead-letters, prune."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from services.cli.follow import follow_events, job_view
from services.cli.helpers import App, command, echo, emit_json, pass_app
from services.cli.job_columns import (
    COLUMNS,
    DEFAULT_COLUMNS,
    ColumnList,
    attempts,
    format_tags,
    headers_for,
    right_indexes,
    rows_for,
)
from services.cli.options import Duration, job_filter, job_filter_options
from services.cli.render import (
    describe_event,
    fmt_age,
    fmt_amount,
    fmt_num,
    fmt_pct,
    fmt_progress,
    fmt_time,
    fmt_value,
    indent,
    table,
)
from services.queue.errors import JobNotFound, JobStateError
from services.queue.job import JobRecord
from services.queue.parsing import finite, json_ready
from services.queue.redis_health import read_health
from services.queue.registry import is_unhealthy, resource_shape, worker_health, worker_resources
from services.queue.selection import JobFilter, record_tags
from services.queue.states import JobState
from services.queue.watch import read_events
from services.spec.types import PRIORITIES
from services.stack import stack as stack_mod
from services.worker.admission import shortfall


def _resources(record: JobRecord) -> str:
    if record.kind == "train":
        ranks = record.cpus
        return (f"{record.gpus} GPU(s), {ranks} rank(s)" if record.gpus
                else f"CPU, {ranks} rank(s)")
    return f"{record.gpus} GPU(s), {record.cpus} CPU(s)"


def job_summary(record: JobRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "tags": record_tags(record), "state": record.state, "kind": record.kind,
            "model": record.model, "priority": record.priority, "gpus": record.gpus, "cpus": record.cpus,
            "attempt": record.attempt, "max_attempts": record.retry_base + record.losses + record.max_retries + 1,
            "progress": record.progress, "progress_text": fmt_progress(record), "created_at": record.created_at,
            "updated_at": record.updated_at, "worker": record.worker, "error": record.error,
            "cause": record.cause}


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
    if all(is_unhealthy(w) for w in workers):
        why = "; ".join(f"{fmt_value(w.get('id'))} {worker_health(w)}" for w in workers[:3])
        return f"every live worker is unhealthy and claims nothing ({why}): fix it or start a healthy worker"
    free = cluster_free(workers)
    if free is None:
        return "no worker has published the cluster's free resources yet"
    short = shortfall(record.resources, free)
    if short is not None:
        return short
    return (f"fits the free resources ({fmt_amount(free['gpus'])} GPU(s), {fmt_amount(free['cpus'])} CPU(s)): next in line "
            f"unless a job of higher priority or older is admitted first")


def print_job(record: JobRecord, waiting: str | None = None) -> None:
    rows: list[tuple[str, Any]] = [
        ("job", record.id + (f"  ({record.name})" if record.name else "")),
        ("state", record.state + ("  (cancel requested)" if record.cancel_requested and not record.is_terminal
                                  else "")),
        ("kind", f"{record.kind}  model {record.model or '-'}  priority {record.priority}"),
        ("resources", _resources(record)),
        ("attempt", f"{attempts(record)}  ({record.retries_left} retries left, "
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
    if record.cause and record.state != "succeeded":  # why the last attempt ended without a result
        rows.append(("cause", record.cause))
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
        echo(indent(table(("AT", "FROM", "TO", "ATTEMPT", "DETAIL"), trows, right=(3,))))



def cluster_info(app: App) -> dict[str, Any]:
    queue = app.queue
    counts: dict[str, int] = dict.fromkeys(JobState, 0)
    by_priority: dict[str, dict[str, int]] = {s: dict.fromkeys(PRIORITIES, 0) for s in JobState}
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
        "redis": read_health(queue.client).to_dict(),
    }


def print_redis_health(app: App, details: bool = True) -> None:
    """Redis memory against maxmemory and the eviction policy (``details``), then every warning."""
    health = read_health(app.queue.client)
    if details:
        echo(f"         memory {health.memory_text()}; {health.policy_text()}")
    for warning in health.warnings():
        echo(f"WARNING  {warning}")


def print_workers(workers: Sequence[Mapping[str, Any]]) -> None:
    rows = []
    for w in workers:
        shape = worker_resources(w)  # None: unreadable, counted in no total
        free = w.get("available")
        free_shape = resource_shape(free)
        rows.append((fmt_value(w.get("id")), fmt_value(w.get("hostname", "-")),
                     "invalid" if shape is None else fmt_amount(shape[0]), "invalid" if shape is None else fmt_amount(shape[1]),
                     "-" if not free else "invalid" if free_shape is None else
                     f"{fmt_amount(free_shape[0])}/{fmt_amount(free_shape[1])}",
                     fmt_value(w.get("current_job") or "-"), worker_health(w), fmt_value(w.get("metrics_url") or "-"),
                     fmt_age(w.get("seen_at"))))
    echo(indent(table(("ID", "HOST", "GPUS", "CPUS", "FREE G/C", "JOB", "HEALTH", "METRICS", "SEEN"), rows,
                             right=(2, 3))))


@command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def status(app: App, job_id: str | None, as_json: bool) -> None:
    """One job in detail, or (without JOB_ID) the cluster: workers, capacity, jobs by state."""
    if job_id:
        record = app.job(job_id)
        waiting = waiting_reason(record, app.queue.workers()) if record.state == "queued" else None
        if as_json:
            emit_json({**record.to_dict(), **({"waiting": waiting} if waiting else {})})
        else:
            print_job(record, waiting)
        return
    info = cluster_info(app)
    if as_json:
        emit_json(info)
        return
    c = info["cluster"]
    echo(f"Redis    {info['redis_url']}")
    print_redis_health(app)
    echo(f"Cluster  {c['workers']} worker(s), {fmt_amount(c['gpus'])} GPU(s), {fmt_amount(c['cpus'])} CPU(s)")
    if info["workers"]:
        print_workers(info["workers"])
    else:
        echo("  no live workers: start one with `capsctl worker` or `capsctl up`")
    echo("Jobs     " + "  ".join(f"{s} {n}" for s, n in info["jobs"].items()))
    if info["dead_letters"]:
        echo(f"Dead letters: {info['dead_letters']} (capsctl dead-letters)")


@command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def workers(app: App, as_json: bool) -> None:
    """Live workers and the cluster's GPU/CPU totals."""
    queue = app.queue
    found = queue.workers()
    capacity = queue.cluster_capacity()
    if as_json:
        emit_json({"workers": found, "cluster": {k: capacity[k] for k in
                                                  ("workers", "gpus", "cpus", "max_gpus", "max_cpus")},
                   "redis": read_health(queue.client).to_dict()})
        return
    if not found:
        echo("no live workers: start one with `capsctl worker` or `capsctl up`")
        print_redis_health(app, details=False)
        return
    print_workers(found)
    echo(f"total: {capacity['workers']} worker(s), {fmt_amount(capacity['gpus'])} GPU(s), "
               f"{fmt_amount(capacity['cpus'])} CPU(s)")
    print_redis_health(app, details=False)


@command("list")
@job_filter_options
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Newest N matching jobs.")
@click.option("--format", "columns", type=ColumnList(), default=",".join(DEFAULT_COLUMNS), show_default=True,
              help=f"Columns to show, comma-separated, from: {','.join(COLUMNS)}.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def list_cmd(app: App, tag_filters: tuple[str, ...], name_glob: str | None, model_filter: str | None,
             kind_filter: str | None, state: str | None, since: float | None, limit: int,
             columns: tuple[str, ...], as_json: bool) -> None:
    """Jobs, newest first; the filters all apply (AND)."""
    selected = job_filter(tag_filters, name_glob, model_filter, kind_filter, state, since)
    records = app.queue.select(selected, limit=limit)
    if as_json:
        emit_json([job_summary(r) for r in records])
        return
    if not records:
        echo("no jobs" + ("" if selected.is_empty else " match"))
        return
    echo(table(headers_for(columns), rows_for(records, columns, time.time()), right=right_indexes(columns)))


@command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option("--steps", is_flag=True, help="Include per-step progress events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line.")
@pass_app
def logs(app: App, job_id: str, follow: bool, steps: bool, as_json: bool) -> None:
    """A job's events: state changes, log lines, epoch summaries. With -f, follows until the job
    ends and exits like ``submit --follow``: 0 if it succeeded, 1 otherwise."""
    record = app.job(job_id)  # unknown id -> one-line error
    job_id = record.id  # a prefix the user typed, resolved
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
            final = follow_events(app.queue, job_id, show)
        except KeyboardInterrupt:
            sys.exit(130)
        _exit_with_outcome(final)
        return
    for entry_id, event in read_events(app.queue, job_id):
        show({"id": entry_id, **event})


def _exit_with_outcome(final: JobRecord) -> None:
    if final.state != "succeeded":
        sys.exit(1)


def _tune_logs(app: App, record: JobRecord, follow: bool) -> None:
    """``logs`` of a tune job: trial events in words and the trials' running summary."""
    view = job_view(record, tty=follow and sys.stdout.isatty(), stamp=lambda at: f"{fmt_time(at)}  ")
    try:
        if follow:
            _exit_with_outcome(follow_events(app.queue, record.id, view.handle))  # the view closes below
            return
        for entry_id, event in read_events(app.queue, record.id):
            view.handle({"id": entry_id, **event})
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        view.close()


def _targets(app: App, job_ids: Sequence[str], selected: JobFilter, verb: str, yes: bool) -> list[JobRecord]:
    """The jobs a bulk ``cancel``/``retry`` touches: the ids (or prefixes) given, else those the
    filters select. More than one, or any chosen by filter, are listed and confirmed first."""
    if job_ids and not selected.is_empty:
        raise click.UsageError(f"give job ids or filters to {verb}, not both")
    if not job_ids and selected.is_empty:
        raise click.UsageError(f"give the job(s) to {verb}: ids, or filters such as --tag sweep=a --state queued")
    records = ([app.job(j) for j in dict.fromkeys(job_ids)] if job_ids
               else app.queue.select(selected))
    records = list({r.id: r for r in records}.values())  # two prefixes of one job: once
    if not records:
        echo(f"no jobs match: nothing to {verb}")
        return []
    if (len(records) > 1 or not job_ids) and not yes:
        echo(f"will {verb} {len(records)} job(s):")
        echo(indent(table(("ID", "NAME", "STATE", "KIND", "TAGS"),
                          [(r.id, r.name or "-", r.state, r.kind, format_tags(r)) for r in records])))
        click.confirm(f"{verb.capitalize()} {len(records)} job(s)?", abort=True)
    return records


def _apply(records: Sequence[JobRecord], act: Callable[[JobRecord], str], single: bool) -> None:
    """Runs ``act`` on each job, printing its line; a job in the wrong state is reported and
    skipped, and the command exits 1 when any was. One explicit job keeps the one-line error."""
    failed = 0
    for record in records:
        try:
            echo(act(record))
        except (JobStateError, JobNotFound) as err:
            if single:
                raise
            echo(f"skipped {record.id}: {err}", err=True)
            failed += 1
    if failed:
        echo(f"Error: {failed} of {len(records)} job(s) skipped", err=True)
        sys.exit(1)


@command()
@click.argument("job_ids", metavar="[JOB ...]", nargs=-1)
@job_filter_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask before touching several jobs (for scripts).")
@pass_app
def cancel(app: App, job_ids: tuple[str, ...], tag_filters: tuple[str, ...], name_glob: str | None,
           model_filter: str | None, kind_filter: str | None, state: str | None, since: float | None,
           yes: bool) -> None:
    """Cancel jobs by id (or unique prefix) or by filter (a running one stops at its next step)."""
    selected = job_filter(tag_filters, name_glob, model_filter, kind_filter, state, since)
    records = _targets(app, job_ids, selected, "cancel", yes)

    def act(record: JobRecord) -> str:
        if app.queue.cancel(record.id) == "cancelled":
            return f"cancelled {record.id}"
        return f"cancel requested for {record.id}: it is running; its worker stops it shortly"

    _apply(records, act, single=len(job_ids) == 1)


@command()
@click.argument("job_ids", metavar="[JOB ...]", nargs=-1)
@job_filter_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask before touching several jobs (for scripts).")
@pass_app
def retry(app: App, job_ids: tuple[str, ...], tag_filters: tuple[str, ...], name_glob: str | None,
          model_filter: str | None, kind_filter: str | None, state: str | None, since: float | None,
          yes: bool) -> None:
    """Queue failed or cancelled jobs again (with a fresh retry budget), by id, prefix or filter."""
    selected = job_filter(tag_filters, name_glob, model_filter, kind_filter, state, since)
    records = _targets(app, job_ids, selected, "retry", yes)

    def act(record: JobRecord) -> str:
        requeued = app.queue.retry(record.id)
        return f"requeued {requeued.id} (state {requeued.state}, {requeued.max_retries} automatic retries)"

    _apply(records, act, single=len(job_ids) == 1)


@command("dead-letters")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True,
              help="Newest N entries.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def dead_letters(app: App, limit: int, as_json: bool) -> None:
    """Jobs (or junk) the queue set aside, newest first, with the reason."""
    entries = app.queue.dead_letters(limit)
    if as_json:
        emit_json(entries)
        return
    if not entries:
        echo("no dead letters")
        return
    rows = [(fmt_time(e.get("at")), fmt_value(e.get("job_id", "-")), fmt_value(e.get("source", "-")),
             fmt_value(e.get("reason", e.get("raw", "")))) for e in entries]
    echo(table(("AT", "JOB", "SOURCE", "REASON"), rows))


PRUNE_BATCH = 500  # jobs per Lua call: each call holds Redis for a few ms only


@command()
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
        emit_json({"pruned": 0 if dry_run else count, "would_prune": count if dry_run else None,
                    "dry_run": dry_run, "older_than_seconds": older_than})
        return
    age = fmt_age(time.time() - older_than)
    click.echo(f"{'would remove' if dry_run else 'removed'} {count} finished job(s) older than {age}")


