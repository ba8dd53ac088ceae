"""Job files: ``capsctl submit|eval|tune -f FILE``. A file holds one or more job specs in YAML
(several ``---`` documents submit several jobs) or JSON, with the same fields as the job specs
(``capsctl schema`` prints them). Flags the user typed beside the file override its values; flags
left at their default, or set only through ``CAPSCTL_*`` variables, do not.

This module reads and merges; validating and submitting stay with the commands, which validate
every document before they submit any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource

from services.cli.helpers import SpecUsageError, in_flag_terms
from services.spec.types import KINDS

# Above this a job file is a mistake (a data file given by accident), not a list of jobs.
MAX_FILE_BYTES = 1 << 20
MAX_DOCUMENTS = 100


@dataclass(frozen=True)
class JobDocument:
    """One job as the command will validate it: the file's values with the typed flags applied.
    ``where`` names it in errors (``job.yaml, document 2``); None for a job given by flags only."""

    spec: dict[str, Any]
    overrides: frozenset[str]
    where: str | None

    def error(self, message: str) -> SpecUsageError:
        """A one-line error for this job: a field the user typed as a flag is named by that flag."""
        field = message.partition(":")[0].split(".")[0].split("[")[0]
        if field in self.overrides or self.where is None:
            message = in_flag_terms(message, click.get_current_context())
        return SpecUsageError(f"{self.where}: {message}" if self.where else message)


def command_of(kind: str) -> str:
    """The capsctl command that submits jobs of ``kind``."""
    return "submit" if kind == "train" else kind


def typed_flags(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (keyed by parameter name) whose flag was typed on the command line."""
    return {key: value for key, value in values.items()
            if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE}


def read_documents(path: Path) -> list[Any]:
    """The documents of a job file: a JSON file (``.json``) is one document, or a list of them;
    anything else is read as YAML, one document per ``---``. Empty documents are skipped."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SpecUsageError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; is it a job file?")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecUsageError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise SpecUsageError(f"{path}: cannot read it ({err.strerror or err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecUsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        documents = data if isinstance(data, list) else [data]
    else:
        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise SpecUsageError(f"{path}: not valid YAML ({problem}{at})") from None
    if not documents:
        raise SpecUsageError(f"{path}: holds no job")
    if len(documents) > MAX_DOCUMENTS:
        raise SpecUsageError(f"{path}: {len(documents)} documents, more than the {MAX_DOCUMENTS} one file may hold")
    return documents


def merged(document: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The document with the typed flags applied; ``model_config`` merges key by key, so
    ``--model-config routing_iters=1`` changes one override and keeps the file's others."""
    out = dict(document)
    for key, value in flags.items():
        if key == "model_config" and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def job_documents(kind: str, flags: dict[str, Any], job_file: Path | None) -> list[JobDocument]:
    """What the command submits: the jobs of ``job_file`` with the typed ``flags`` applied, or
    one job of ``flags`` alone. ``flags`` are the spec fields the command's options gave."""
    if job_file is None:
        return [JobDocument({"kind": kind, **flags}, frozenset(flags), None)]
    typed = typed_flags(click.get_current_context(), flags)
    documents = read_documents(job_file)
    jobs = []
    for index, document in enumerate(documents, start=1):
        where = f"{job_file}, document {index}" if len(documents) > 1 else str(job_file)
        if not isinstance(document, dict):
            raise SpecUsageError(f"{where}: must be a mapping of spec fields (got {type(document).__name__})")
        given_kind = document.get("kind", kind)
        if given_kind != kind:
            use = (f" (use `capsctl {command_of(given_kind)} -f`)" if given_kind in KINDS
                   else f"; one of {', '.join(KINDS)}")
            raise SpecUsageError(f"{where}: kind: {given_kind!r} in a file given to `capsctl {command_of(kind)}`{use}")
        jobs.append(JobDocument(merged({**document, "kind": kind}, typed), frozenset(typed), where))
    return jobs


__all__ = ["JobDocument", "job_documents", "merged", "read_documents", "typed_flags"]
