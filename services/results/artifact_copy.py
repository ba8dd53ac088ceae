"""Copying a job's files (checkpoints, plots, result files) out of a local artifact store.

One function, so that a store behind a URI (``s3://...``) can be added beside it without the
callers (the Python client) changing."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.artifacts import is_uri


def copy_job_artifacts(store: str | Path, job_id: str, out: str | Path) -> Path:
    """Copy ``<store>/<job_id>`` to ``<out>/<job_id>``; returns that folder. ``FileNotFoundError``
    when the store holds nothing for the job; ``ValueError`` for a store given as a URI."""
    if is_uri(str(store)):
        raise ValueError(f"artifacts: {store} is a URI; only a local artifact folder can be copied here")
    source = Path(store).expanduser() / job_id
    if not source.is_dir():
        raise FileNotFoundError(f"artifacts: no files for job {job_id} in {source.parent}")
    target = Path(out).expanduser() / job_id
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target
