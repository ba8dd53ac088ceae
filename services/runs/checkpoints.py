"""Verified checkpoints: what rank 0 records of each checkpoint (epoch, URI, size, SHA-256),
how a resumed attempt picks the one to start from, and how Ray's run snapshot is kept from
bricking a job.

A checkpoint on storage can be damaged after it was written: truncated by a crash or a full
disk, bytes flipped, its folder deleted. Ray Train's own ``checkpoint_manager_snapshot.json``
is written in place and can be left empty or half-written. So capsctl relies only on its own
record (``JobRecord.checkpoints``, the last ``KEEP_CHECKPOINTS``): a resume walks back from
the newest, skips (with one warning naming the file and why) any whose size or digest does
not match or that does not load, and starts from epoch 0 when none is left. A damaged
checkpoint therefore never fails an attempt, and never uses up ``max_retries``.

No Ray import at module level (the unit tests run without Ray).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.artifacts import is_uri

# Checkpoints kept on storage (Ray's num_to_keep) and in the job record: the newest plus two
# fallbacks, so one damaged checkpoint, or a damaged one and its missing predecessor (a disk
# that filled up over two epochs), still leaves an intact one to resume from.
KEEP_CHECKPOINTS = 3

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_EPOCH_DIR = re.compile(r"epoch-(\d+)$")


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as rank 0 reported it: ``uri`` is its folder on storage (holding
    ``file``); ``size`` and ``sha256`` are those of ``file`` as it was written."""

    epoch: int
    uri: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def verifiable(self) -> bool:
        return self.size is not None and self.sha256 is not None


def file_digest(path: str | Path, chunk_bytes: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def entry_for(path: str | Path, epoch: int, uri: str) -> CheckpointEntry:
    size, sha = file_digest(path)
    return CheckpointEntry(epoch=epoch, uri=uri, size=size, sha256=sha)


def epoch_of(uri: str) -> int:
    """The epoch an ``.../epoch-NNNN`` URI names, or -1."""
    match = _EPOCH_DIR.search(uri.rstrip("/"))
    return int(match.group(1)) if match else -1


def parse_entries(raw: Any) -> list[CheckpointEntry]:
    """The job record's ``checkpoints`` field (a JSON list, or already decoded); tolerant of
    junk: entries that are not {epoch, uri, ...} are dropped."""
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []
    entries = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str) or not isinstance(item.get("epoch"), int):
            continue
        size, sha = item.get("size"), item.get("sha256")
        entries.append(CheckpointEntry(epoch=item["epoch"], uri=item["uri"],
                                       size=size if isinstance(size, int) else None,
                                       sha256=sha if isinstance(sha, str) else None))
    return entries


def resume_candidates(entries: Iterable[CheckpointEntry], legacy_uri: str | None) -> list[CheckpointEntry]:
    """Newest first, one per epoch: the recorded checkpoints, and the record's plain
    ``checkpoint`` URI (written before checkpoints were recorded with digests) when no recorded
    entry names it (that one can only be checked by loading it)."""
    by_uri = {e.uri.rstrip("/"): e for e in entries}
    if legacy_uri and legacy_uri.rstrip("/") not in by_uri:
        by_uri[legacy_uri.rstrip("/")] = CheckpointEntry(epoch=epoch_of(legacy_uri), uri=legacy_uri)
    newest: dict[int, CheckpointEntry] = {}
    for entry in by_uri.values():
        newest.setdefault(entry.epoch, entry)
    return sorted(newest.values(), key=lambda e: e.epoch, reverse=True)


def verify_file(path: Path, entry: CheckpointEntry) -> str | None:
    """Why the checkpoint file at ``path`` is not the one ``entry`` recorded, or None."""
    if not path.is_file():
        return "missing"
    if not entry.verifiable:
        return None
    size, sha = file_digest(path)
    if size != entry.size:
        return f"size {size} bytes, {entry.size} recorded (truncated or overwritten)"
    if sha != entry.sha256:
        return f"SHA-256 {sha[:12]}..., {entry.sha256[:12]}... recorded (corrupted)"
    return None


@dataclass(frozen=True)
class Skipped:
    entry: CheckpointEntry
    file: str
    reason: str


def walk_back(candidates: list[CheckpointEntry], fetch: Callable[[CheckpointEntry], Path | None],
              check_loads: Callable[[Path], None]) -> tuple[CheckpointEntry | None, Path | None, list[Skipped]]:
    """The newest candidate whose file matches its record and loads: (entry, local file,
    skipped ones with why). ``fetch`` returns the local path of an entry's file (None: its
    folder is gone); ``check_loads`` raises when a file cannot be loaded."""
    skipped: list[Skipped] = []
    for entry in candidates:
        try:
            path = fetch(entry)
        except Exception as exc:  # storage said no: as good as missing
            skipped.append(Skipped(entry, entry.uri, f"could not be read ({_one_line(exc)})"))
            continue
        if path is None:
            skipped.append(Skipped(entry, entry.uri, "missing"))
            continue
        reason = verify_file(path, entry)
        if reason is None:
            try:
                check_loads(path)
            except Exception as exc:
                reason = f"does not load ({_one_line(exc)})"
        if reason is None:
            return entry, path, skipped
        skipped.append(Skipped(entry, _display(entry, path), reason))
    return None, None, skipped


def _display(entry: CheckpointEntry, path: Path) -> str:
    return f"{entry.uri.rstrip('/')}/{path.name}" if is_uri(entry.uri) else str(path)


def _one_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


def fetch_to(workdir: Path, file_name: str) -> Callable[[CheckpointEntry], Path | None]:
    """A ``fetch`` for ``walk_back``: a local folder is read in place; a URI (``s3://``...) is
    downloaded into ``workdir`` through Ray's storage layer."""

    def fetch(entry: CheckpointEntry) -> Path | None:
        if not is_uri(entry.uri):
            folder = Path(entry.uri)
            return folder / file_name if folder.is_dir() else None
        import ray.train

        target = Path(tempfile.mkdtemp(dir=workdir, prefix=f"epoch-{entry.epoch:04d}-"))
        try:
            ray.train.Checkpoint(entry.uri).to_directory(str(target))
        except FileNotFoundError:
            shutil.rmtree(target, ignore_errors=True)
            return None
        return target / file_name

    return fetch


def quarantine(path: Path, now: float | None = None) -> Path:
    """Move a bad file or folder aside as ``<name>.corrupt-<unix ms>``, kept for inspection."""
    target = path.with_name(f"{path.name}.corrupt-{int((now or time.time()) * 1000)}")
    path.rename(target)
    return target


def ray_snapshot_problem(run_dir: Path, ray_version: str, resume_epoch: int | None = None) -> str | None:
    """Why Ray Train could not restore its checkpoint manager from ``run_dir``'s snapshot (it
    raises in ``TrainController.__init__`` and fails every attempt), or None when it can (or
    there is no snapshot: Ray then starts afresh).

    With ``resume_epoch`` (0: from scratch), a snapshot naming a later epoch is a problem too:
    the attempt writes that epoch's folder again, and Ray, pruning its older entry of the same
    name, would delete the new checkpoint under the running attempt."""
    path = run_dir / RAY_SNAPSHOT_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"unreadable ({_one_line(exc) or 'empty'})"
    if not isinstance(state, dict) or not isinstance(state.get("checkpoint_results"), list):
        return "not a checkpoint manager snapshot"
    if state.get("ray_version") != ray_version:
        return f"written by Ray {state.get('ray_version')!r}, this is Ray {ray_version}"
    schema_problem = _ray_schema_problem(state)
    if schema_problem is not None:
        return schema_problem
    for result in state["checkpoint_results"]:
        name = result.get("checkpoint_dir_name") if isinstance(result, dict) else None
        if not isinstance(name, str):
            return "a checkpoint entry without checkpoint_dir_name"
        if not (run_dir / name).is_dir():
            return f"names {name}, which no longer exists"
        if resume_epoch is not None and epoch_of(name) > resume_epoch:
            return f"names {name}, later than the epoch {resume_epoch} this attempt resumes from"
    return None


def _ray_schema_problem(state: dict[str, Any]) -> str | None:
    """Ray's own validation of the snapshot (a private model: skipped if this Ray has none)."""
    try:
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
    except ImportError:
        return None
    try:
        _CheckpointManagerState.model_validate(state)
    except Exception as exc:  # pydantic.ValidationError
        return f"not what Ray Train expects ({_one_line(exc)})"
    return None


def iter_warnings(skipped: list[Skipped]) -> Iterator[tuple[str, dict[str, Any]]]:
    """One (message, event fields) per skipped checkpoint."""
    for s in skipped:
        yield (f"checkpoint of epoch {s.entry.epoch} skipped: {s.file} {s.reason}; trying an older one",
               {"level": "warning", "checkpoint_skipped": s.file, "epoch": s.entry.epoch, "reason": s.reason})
