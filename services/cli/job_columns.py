"""The columns ``capsctl list --format`` picks from (as ``squeue -o``): each a header and how to
show one job in it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from services.cli.render import fmt_age, fmt_progress
from services.queue.job import JobRecord
from services.queue.selection import record_tags


def attempts(record: JobRecord) -> str:
    """``attempt/most attempts`` (retries and lost-worker resumes included)."""
    return f"{record.attempt}/{record.retry_base + record.losses + record.max_retries + 1}"


def format_tags(record: JobRecord) -> str:
    tags = record_tags(record)
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


# name -> (header, value of a record at time ``now``)
COLUMNS: dict[str, tuple[str, Callable[[JobRecord, float], Any]]] = {
    "id": ("ID", lambda r, now: r.id),
    "name": ("NAME", lambda r, now: r.name or "-"),
    "state": ("STATE", lambda r, now: r.state),
    "kind": ("KIND", lambda r, now: r.kind),
    "model": ("MODEL", lambda r, now: r.model or "-"),
    "priority": ("PRIORITY", lambda r, now: r.priority),
    "gpus": ("GPUS", lambda r, now: r.gpus),
    "cpus": ("CPUS", lambda r, now: r.cpus),
    "attempt": ("ATTEMPT", lambda r, now: attempts(r)),
    "progress": ("PROGRESS", lambda r, now: fmt_progress(r)),
    "age": ("AGE", lambda r, now: fmt_age(r.created_at, now)),
    "worker": ("WORKER", lambda r, now: r.worker or "-"),
    "tags": ("TAGS", lambda r, now: format_tags(r)),
    "error": ("ERROR", lambda r, now: r.error or "-"),
}
RIGHT_ALIGNED = ("gpus", "cpus", "attempt")
DEFAULT_COLUMNS = ("id", "name", "state", "kind", "model", "gpus", "attempt", "progress", "age", "worker", "tags")


class ColumnList(click.ParamType):
    """``id,name,state``: column names of COLUMNS; an unknown one is a one-line usage error that
    lists the valid names."""

    name = "COLS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        names = tuple(v.strip().lower() for v in str(value).split(","))
        unknown = [n for n in names if n not in COLUMNS]
        if unknown or not names:
            self.fail(f"unknown column(s) {', '.join(repr(n) for n in unknown)}; valid columns: "
                      f"{','.join(COLUMNS)}", param, ctx)
        return names


def rows_for(records: Sequence[JobRecord], columns: Sequence[str], now: float) -> list[tuple[Any, ...]]:
    return [tuple(COLUMNS[c][1](r, now) for c in columns) for r in records]


def headers_for(columns: Sequence[str]) -> tuple[str, ...]:
    return tuple(COLUMNS[c][0] for c in columns)


def right_indexes(columns: Sequence[str]) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(columns) if c in RIGHT_ALIGNED)


__all__ = ["COLUMNS", "DEFAULT_COLUMNS", "ColumnList", "attempts", "format_tags", "headers_for", "right_indexes", "rows_for"]
