"""TensorBoard event files of a train job, written by rank 0 beside its checkpoints
(``<artifacts>/<job id>/tensorboard``), with the tag names Ray Tune's own trials use
(``ray/tune/<metric>``) so that one ``tensorboard --logdir`` reads both side by side.

tensorboardX writes them: it comes with ``ray[tune]`` (whose ``TBXLoggerCallback`` writes the
tune trials' files), and is far lighter than ``torch.utils.tensorboard``, which needs the whole
``tensorboard`` package. Like the plots, the files are a courtesy: a failure to write them is
one warning event, never a failed job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from services.artifacts import is_uri

TENSORBOARD_DIR = "tensorboard"
_EPOCH_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second", "lr")


def tensorboard_dir(artifacts: str, job_id: str) -> Path | None:
    """Where a train job's event files go; None for URI storage (tensorboardX writes local files)."""
    if is_uri(artifacts):
        return None
    return Path(artifacts).expanduser() / job_id / TENSORBOARD_DIR


class EventFiles:
    """Per-epoch curves and the final accuracy per test angle, as TensorBoard scalars."""

    def __init__(self, folder: Path, warn: Callable[..., None]) -> None:
        self._warn = warn
        self._writer: Any = None
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(folder), flush_secs=10)
        except Exception as exc:  # not installed, or the folder cannot be written
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._writer = None
        self._warn(f"could not write TensorBoard event files: {type(exc).__name__}: {exc}")

    def epoch(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        try:
            for name in _EPOCH_SCALARS:
                if isinstance(record.get(name), int | float):
                    self._writer.add_scalar(f"ray/tune/{name}", float(record[name]), int(record["epoch"]))
            self._writer.flush()
        except Exception as exc:
            self._fail(exc)

    def rotation(self, accuracy: Mapping[str, float], epoch: int) -> None:
        """Accuracy per test angle at the last epoch (``rotation_accuracy/<angle>``)."""
        if self._writer is None:
            return
        try:
            for angle, value in accuracy.items():
                self._writer.add_scalar(f"ray/tune/rotation_accuracy/{angle}", float(value), epoch)
            self._writer.flush()
        except Exception as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                self._fail(exc)
