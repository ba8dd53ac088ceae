"""``capsctl artifacts J``: download a job's files from wherever its worker wrote them.

The job record names the location (its checkpoint URI: a local folder or any URI ``pyarrow.fs``
opens, ``s3://``...), so this works from any machine that can reach the storage, not only
the worker's. ``results`` and ``logs`` come from the job record and its event log in Redis.
"""

from __future__ import annotations

from pathlib import Path

import click

from services.cli.helpers import App, UserError, command, echo, pass_app
from services.queue.watch import read_events
from services.results.artifact_copy import PARTS, ArtifactsUnavailable, download_job_artifacts


def _parts(value: str) -> list[str]:
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {','.join(PARTS)} (got {value!r})", param_hint="'--what'")
    return chosen


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
    events = (event for _, event in read_events(app.queue, record.id)) if "logs" in parts else ()
    try:
        written = download_job_artifacts(record, app.settings.artifacts, out_dir or Path(job_id), parts, events)
    except ArtifactsUnavailable as err:
        raise UserError(str(err)) from None
    for path in written:
        echo(path)
    if not written:
        echo(f"nothing to download for job {job_id} ({', '.join(parts)})")
