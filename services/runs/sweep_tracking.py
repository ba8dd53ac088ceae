"""A tune job's MLflow runs, logged by the sweep's driver: the sweep's run, opened when the sweep
starts, and one child run per trial whose curve grows as the trial reports its epochs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.runs.tracking import Tracker, epoch_metrics, result_metrics, spec_params

TRIAL_PARAMS = ("model", "augment", "train_angle", "lr", "routing_iters", "seed")


class SweepRuns:
    """The sweep's run and its trials' child runs (found again on a later attempt of the job, so
    a resumed trial continues its own curve instead of starting a second one)."""

    def __init__(self, sweep: Tracker) -> None:
        self.sweep = sweep
        self._trials: dict[str, Tracker] = {}
        self._finished: set[str] = set()

    def trial(self, trial: Mapping[str, Any]) -> Tracker:
        key = str(trial["key"])
        if key not in self._trials:
            self._trials[key] = self.sweep.child(
                key, {"capsctl.kind": "trial", "capsctl.trial": key, "capsctl.model": str(trial.get("model"))},
                spec_params({k: trial.get(k) for k in TRIAL_PARAMS}), resume=True)
        return self._trials[key]

    def epoch(self, trial: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """One reported epoch of a running trial (an epoch already logged is not logged twice)."""
        epoch = result.get("epoch")
        if not isinstance(epoch, int):
            return
        run = self.trial(trial)
        if epoch not in run.logged_steps:
            run.log_metrics(epoch_metrics(result), step=epoch)
            run.logged_steps.add(epoch)

    def final(self, document: Mapping[str, Any]) -> None:
        """A trial's final document: the epochs not yet logged, its results, and the run's end."""
        run = self.trial(document)
        run.set_tag("capsctl.status", str(document.get("status")))
        for record in document.get("history") or []:
            if isinstance(record, Mapping) and isinstance(record.get("epoch"), int) \
                    and record["epoch"] not in run.logged_steps:
                run.log_metrics(epoch_metrics(record), step=record["epoch"])
                run.logged_steps.add(record["epoch"])
        final = result_metrics(document)
        if isinstance(document.get("val_accuracy"), int | float):
            final["final_val_accuracy"] = float(document["val_accuracy"])
        run.log_metrics(final, step=int(document.get("epochs_trained") or 0))
        run.finish()
        self._finished.add(str(document["key"]))

    def abandon(self, status: str) -> None:
        """The sweep ended without a result (failed, cancelled): close every run still open."""
        for key, run in self._trials.items():
            if key not in self._finished:
                run.finish(status)
        self.sweep.finish(status)


__all__ = ["TRIAL_PARAMS", "SweepRuns"]
