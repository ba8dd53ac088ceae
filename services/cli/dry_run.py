"""``--dry-run``: what a submit would enqueue, printed instead of enqueued: the validated spec
(every default filled in), the resources a worker will claim for it, and for a sweep the number
of trials it expands to. YAML by default (one document per job, so a multi-document file reads
back the same way), JSON with ``--json``."""

from __future__ import annotations

from typing import Any

import yaml

from services.cli.helpers import echo, emit_json
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec

JobSpecModel = TrainSpec | EvalSpec | TuneSpec


def plan(spec: JobSpecModel) -> dict[str, Any]:
    """The dry-run report of one validated spec."""
    report: dict[str, Any] = {"spec": spec.to_dict(), "resources": spec.resources()}
    if isinstance(spec, TrainSpec):
        report["ranks"] = spec.ranks
    if isinstance(spec, TuneSpec):
        report["trials"] = spec.num_trials()
    return report


def print_plans(specs: list[JobSpecModel], as_json: bool) -> None:
    reports = [plan(spec) for spec in specs]
    if as_json:
        emit_json(reports[0] if len(reports) == 1 else reports)
        return
    echo(yaml.safe_dump_all(reports, sort_keys=False, default_flow_style=None).rstrip())


__all__ = ["plan", "print_plans"]
