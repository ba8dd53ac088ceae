"""A finished (or running) job's files out of the artifact store, wherever its worker wrote them:
the checkpoint folder the job recorded, its plots, and from Redis its result and event log. The
one implementation behind ``capsctl artifacts`` and ``Client.artifacts``; local folders and any
URI ``pyarrow.fs`` opens (``s3://``...) alike, through ``services.artifacts``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from services.artifacts import copy_to_local, join, list_files, parent
from services.queue.job import JobRecord

PARTS = ("checkpoint", "plots", "results", "logs")


class ArtifactsUnavailable(Exception):
    """Nothing can be downloaded as asked; the message is one line."""


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
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ArtifactsUnavailable(f"cannot read {location}: {str(err).splitlines()[0]}") from None


def download_job_artifacts(record: JobRecord, store: str, out: str | Path, parts: Sequence[str] = PARTS,
                           events: Iterable[dict[str, Any]] = (), require_checkpoint: bool = True) -> list[str]:
    """Write the chosen ``parts`` of the job into ``out``; returns the files written.

    ``checkpoint`` is the folder the job recorded (``ArtifactsUnavailable`` when it recorded none
    and ``require_checkpoint``), ``plots`` its plots folder, ``results`` the stored result as
    ``result.json``, ``logs`` ``events`` as ``events.jsonl``."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    out = Path(out).expanduser()
    checkpoint = checkpoint_location(record)
    run_dir = parent(checkpoint) if checkpoint else join(store, record.id)
    written: list[str] = []
    if "checkpoint" in parts:
        if checkpoint is not None:
            written += _copy_tree(checkpoint, out, "checkpoint")
        elif require_checkpoint:
            raise ArtifactsUnavailable(f"job {record.id} recorded no checkpoint (state {record.state})")
    if "plots" in parts:  # beside the checkpoints, else in the store's folder of the job
        plots = _copy_tree(join(run_dir, "plots"), out, "plots")
        if not plots and run_dir != join(store, record.id):
            plots = _copy_tree(join(store, record.id, "plots"), out, "plots")
        written += plots
    if "results" in parts and record.result is not None:
        os.makedirs(out, exist_ok=True)
        (out / "result.json").write_text(json.dumps(record.result, indent=2, sort_keys=True, default=str))
        written.append(str(out / "result.json"))
    if "logs" in parts:
        os.makedirs(out, exist_ok=True)
        with open(out / "events.jsonl", "w") as fh:
            for event in events:
                fh.write(json.dumps(event, sort_keys=True, default=str) + "\n")
        written.append(str(out / "events.jsonl"))
    return written
