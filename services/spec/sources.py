"""Where ``eval`` may read a checkpoint from, and whether a local file is safe to load.

A job spec is user input: its ``source`` may name any path or URI. Workers read only job ids
(whose checkpoints our own workers wrote into the artifact storage), the artifact storage
itself (``CAPSNET_ARTIFACTS``), and the folders or URI prefixes the operator lists in
``CAPSNET_EVAL_ROOTS``. Local paths are resolved first (symlinks followed, ``..`` removed), so
neither escapes an allowed root. ``capsctl eval`` checks this at submit (exit 2) and the worker
again before reading (a spec written straight into Redis gets no pass).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from services.artifacts import is_uri
from services.spec.types import JOB_ID_RE

CHECKPOINT_FILE = "checkpoint.pt"


class SourceRefused(ValueError):
    """An eval source outside the allowed roots, or a file that is not a safe checkpoint (one line)."""


def _is_uri(text: str) -> bool:
    return is_uri(text)


def _local(text: str) -> Path:
    return Path(text.removeprefix("file://")).expanduser().resolve()


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_source_allowed(source: str, artifacts: str, extra_roots: Iterable[str] = ()) -> str:
    """The source itself when eval may read it, else ``SourceRefused``.

    Job ids are always allowed (they are resolved through the queue); a path or URI must lie
    within ``artifacts`` or one of ``extra_roots``.
    """
    if JOB_ID_RE.match(source):
        return source
    roots = [artifacts, *extra_roots]
    allowed = ", ".join(roots)
    if _is_uri(source):
        scheme_path = source.split(":", 1)[1].lstrip("/")
        if any(part in ("..", ".") for part in scheme_path.split("/")):
            raise SourceRefused(f"source: {source} contains '.' or '..' segments; name the checkpoint directly")
        for root in filter(_is_uri, roots):
            prefix = root.rstrip("/") + "/"
            if source == root.rstrip("/") or source.startswith(prefix):
                return source
        raise SourceRefused(f"source: {source} is outside the allowed eval sources ({allowed}); "
                            f"an operator can add roots with CAPSNET_EVAL_ROOTS")
    path = _local(source)
    if not path.exists() and "/" not in source and not source.startswith((".", "~")):
        # A bare word that is neither a job id nor a file: most likely a mistyped id.
        raise SourceRefused(f"source: no job {source} and no file or folder {source} (see `capsctl list`)")
    for root in roots:
        if not _is_uri(root) and _within(path, _local(root)):
            return source
    raise SourceRefused(f"source: {source} (resolved {path}) is outside the allowed eval sources ({allowed}); "
                        f"an operator can add roots with CAPSNET_EVAL_ROOTS")


def local_checkpoint_file(source: str) -> Path | None:
    """The checkpoint file a local source names (the file, or ``checkpoint.pt`` in a folder),
    or None for URIs, job ids and paths this process cannot read."""
    if _is_uri(source) or JOB_ID_RE.match(source):
        return None
    path = _local(source)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return path if path.is_file() and _readable(path) else None


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def check_checkpoint_file(path: Path) -> None:
    """``SourceRefused`` unless `path` loads as a capsnet_core checkpoint with ``weights_only``
    (nothing in it can run code)."""
    from capsnet_core.checkpoint import CheckpointRejected, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointRejected as err:
        raise SourceRefused(f"source: {err}") from None
