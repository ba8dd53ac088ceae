"""``capsctl artifacts J``: download a job's files from wherever its worker wrote them.

The job record names the location (its checkpoint URI: a local folder or any URI ``pyarrow.fs``
opens, ``s3://``...), so this works from any machine that can reach the storage, not only
the worker's. ``results`` and ``logs`` come from the job record and its event log in Redis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from services.artifacts import copy_to_local, join, list_files, parent
from services.cli.helpers import App, UserError, command, echo, pass_app
from services.queue.job import JobRecord

PARTS = ("checkpoint", "plots", "results", "logs")


def _parts(value: str) -> list[str]:
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {','.join(PARTS)} (got {value!r})", param_hint="'--what'")
    return chosen


def checkpoint_location(record: JobRecord) -> str | None:
    """The newest checkpoint folder the job recorded (its result's, else the running record's)."""
    result = record.result if isinstance(record.result, dict) else {}
    found = result.get("checkpoint") or record.checkpoint
    if not found:
        return None
    found = str(found)
    return parent(found) if found.endswith(".pt") else found


def _copy_tree(location: str, out: Path, name: str) -> list[str]:
    try:
        return [copy_to_local(location, rel, str(out / name)) for rel in list_files(location)]
    except OSError as err:
        raise UserError(f"cannot read {location}: {str(err).splitlines()[0]}") from None


@command("artifacts")
@click.argument("job_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write into [default ./<job id>].")
@click.option("--what", default=",".join(PARTS), show_default=True, metavar="LIST",
              help="Comma-separated parts: checkpoint, plots, results, logs.")
@pass_app
def artifacts(app: App, job_id: str, out_dir: Path | None, what: str) -> None:
    """Download a job's checkpoint, plots, result and log from the artifact store; prints each file."""
    parts = _parts(what)
    record = app.job(job_id)
    out = (out_dir or Path(job_id)).expanduser()
    checkpoint = checkpoint_location(record)
    run_dir = parent(checkpoint) if checkpoint else join(app.settings.artifacts, record.id)
    written: list[str] = []
    if "checkpoint" in parts:
        if checkpoint is None:
            raise UserError(f"job {job_id} recorded no checkpoint (state {record.state})")
        written += _copy_tree(checkpoint, out, "checkpoint")
    if "plots" in parts:
        written += _copy_tree(join(run_dir, "plots"), out, "plots")
    if "results" in parts and record.result is not None:
        os.makedirs(out, exist_ok=True)
        (out / "result.json").write_text(json.dumps(record.result, indent=2, sort_keys=True, default=str))
        written.append(str(out / "result.json"))
    if "logs" in parts:
        os.makedirs(out, exist_ok=True)
        with open(out / "events.jsonl", "w") as fh:
            for _, event in app.queue.events.read(record.id):
                fh.write(json.dumps(event, sort_keys=True, default=str) + "\n")
        written.append(str(out / "events.jsonl"))
    for path in written:
        echo(path)
    if not written:
        echo(f"nothing to download for job {job_id} ({', '.join(parts)})")
