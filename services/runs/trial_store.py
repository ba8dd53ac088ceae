"""A tune trial's own state, ``<experiment>/trials/<trial key>/``: ``checkpoint.pt`` (its last
epoch, a ``capsnet_core`` checkpoint, replaced after every epoch) and ``final.json`` (the finished
trial's measurements, ``final_document``), on a local folder or any URI pyarrow reads.

Why not only Tune's checkpoints: Tune snapshots its experiment state every 10 s or more, so after
a SIGKILL the restored state can name a checkpoint one or more epochs old (or one already
deleted), and can list a trial that had finished as still running. A trial therefore resumes
from the newest of its own files, and a trial whose ``final.json`` exists re-reports it without
training or evaluating. Pure: no Ray.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.artifacts import is_uri, normalize
from services.runs.runtime import CHECKPOINT_FILE

if TYPE_CHECKING:
    from services.runs.runtime import JobContext
    from services.spec.jobspec import TuneSpec

FINAL_FILE = "final.json"
TRIALS_DIR = "trials"


def experiment_path(ctx: JobContext) -> str:
    base = normalize(ctx.artifacts)
    return f"{base.rstrip('/')}/{ctx.job_id}-tune"


class TrialStore:
    """``<experiment>/trials/<key>/``: a trial's last checkpoint and final result (local or a URI)."""

    def __init__(self, experiment: str, key: str) -> None:
        import pyarrow.fs as pafs

        self.uri = f"{experiment}/{TRIALS_DIR}/{key}"
        if is_uri(self.uri):
            self.fs, self.path = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), self.uri

    @property
    def checkpoint_uri(self) -> str:
        """What ``load_model`` / ``capsctl eval`` take: the file locally, else the folder URI."""
        return f"{self.uri}/{CHECKPOINT_FILE}" if not is_uri(self.uri) else self.uri

    def _exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def write_atomically(self, name: str, source: Path | None = None, data: bytes | None = None) -> None:
        """Write a file so readers see the old or the new version, never half of one."""
        self.fs.create_dir(self.path, recursive=True)
        tmp = f"{self.path}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            if source is not None:
                with open(source, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            else:
                out.write(data or b"")
        self.fs.move(tmp, f"{self.path}/{name}")

    def has_checkpoint(self) -> bool:
        return self._exists(CHECKPOINT_FILE)

    def put_checkpoint(self, local: Path) -> None:
        self.write_atomically(CHECKPOINT_FILE, source=local)

    def fetch_checkpoint(self, dest: Path) -> Path | None:
        if not self.has_checkpoint():
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(f"{self.path}/{CHECKPOINT_FILE}") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        return dest

    def final(self) -> dict[str, Any] | None:
        if not self._exists(FINAL_FILE):
            return None
        with self.fs.open_input_stream(f"{self.path}/{FINAL_FILE}") as src:
            return json.loads(src.read().decode())

    def put_final(self, document: dict[str, Any]) -> None:
        self.write_atomically(FINAL_FILE, data=json.dumps(document, sort_keys=True).encode())


def final_document(trial: dict[str, Any], spec: TuneSpec, history: list[dict[str, Any]],
                   rotation: dict[str, float], per_class: dict[str, list[float]], status: str,
                   device: str, world_size: int = 1, suites: dict[str, float] | None = None,
                   confusion: dict[str, list[list[int]]] | None = None) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {**trial, "status": status, "epochs": spec.epochs, "epochs_trained": int(last.get("epoch", 0)),
            # the validation split's, never the test set's: every selection is made on it
            "val_accuracy": last.get("val_accuracy"), "rotation_accuracy": rotation, "per_class": per_class,
            "suite_accuracy": dict(suites or {}), "confusion": dict(confusion or {}),
            "history": [{k: v for k, v in h.items()
                         if k not in ("per_class", "rotation_accuracy", "suite_accuracy", "confusion")}
                        for h in history],
            "train_seconds": sum(h.get("epoch_seconds") or 0.0 for h in history),
            "device": device, "world_size": world_size, "finished_at": time.time()}
