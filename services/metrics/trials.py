"""Live gauges of a sweep's trials (``TrialMetrics``): one series per trial of each tune job a
worker runs, labelled ``job_id`` and ``trial`` (the trial's index, ``t003``), bounded in jobs and
trials; fed by the sweep's ``trial`` progress events."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from services.metrics.labels import label_value
from services.queue.parsing import finite

_LABELS = ("job_id", "trial")


def trial_label(key: Any) -> str | None:
    """``t003`` from a trial key ``t003-lenet5-shift2-lr0.001-s0`` (the index: bounded by the
    sweep's size, and short); None for anything else."""
    head = str(key).split("-", 1)[0] if isinstance(key, str) else ""
    return head if len(head) >= 2 and head[0] == "t" and head[1:].isdigit() else None


class TrialMetrics:
    """``capsnet_tune_trial_epoch`` and ``capsnet_tune_trial_val_accuracy_ratio`` per trial.

    At most ``max_trials`` trials per job (later ones are not exported: a dashboard of hundreds of
    lines reads as noise) and ``max_jobs`` jobs (the least recently updated is dropped)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, max_jobs: int = 8, max_trials: int = 64) -> None:
        self.max_jobs, self.max_trials = max_jobs, max_trials
        self.epoch = Gauge("capsnet_tune_trial_epoch", "Epochs a tune trial has finished (its latest report).",
                           _LABELS, registry=registry)
        self.val_accuracy = Gauge("capsnet_tune_trial_val_accuracy_ratio",
                                  "Latest upright validation accuracy (0..1) of a tune trial.", _LABELS,
                                  registry=registry)
        self._jobs: OrderedDict[str, set[str]] = OrderedDict()  # job label -> its trial labels
        self._lock = threading.Lock()

    def gauges(self) -> list[Gauge]:
        return [self.epoch, self.val_accuracy]

    def observe(self, job_id: str, event: Mapping[str, Any]) -> None:
        trial = trial_label(event.get("trial"))
        if trial is None:
            return
        job = label_value(job_id)
        with self._lock:
            trials = self._jobs.setdefault(job, set())
            self._jobs.move_to_end(job)
            while len(self._jobs) > self.max_jobs:
                self._remove_locked(next(iter(self._jobs)))
            if trial not in trials and len(trials) >= self.max_trials:
                return
            trials.add(trial)
            for gauge, value in ((self.epoch, event.get("epoch")), (self.val_accuracy, event.get("val_accuracy"))):
                number = finite(value)
                if number is not None:
                    gauge.labels(job, trial).set(number)

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._remove_locked(label_value(job_id))

    def _remove_locked(self, job: str) -> None:
        for trial in self._jobs.pop(job, set()):
            for gauge in self.gauges():
                try:
                    gauge.remove(job, trial)
                except KeyError:
                    pass
