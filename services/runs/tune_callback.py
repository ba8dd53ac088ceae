"""The driver side of a tune job: ``SweepCallback`` runs in the worker process (Tune's driver).

It publishes a ``{"type": "trial", ...}`` progress event per trial start, epoch and end, keeps a
fenced ``{"type": "tune", "trials": N, "trials_done": k}`` in the job record, and once a second
checks the job record: on a cancel request (or a lost lease) it aborts the Tune loop, which stops
every trial actor (``run_tune_job`` then raises ``JobCancelled``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from services.queue.jobqueue import JobQueue
from services.runs.runtime import JobChannel, JobContext
from services.runs.sweep_tracking import SweepRuns

log = logging.getLogger("capsctl.tune")


@dataclass
class Live:
    """What the driver callback needs in this process (looked up by job id, never pickled)."""

    ctx: JobContext
    queue: JobQueue
    channel: JobChannel
    total: int
    done: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    last_val: dict[str, float] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)
    runs: SweepRuns | None = None  # the sweep's MLflow runs, when it is tracked


LIVE: dict[str, Live] = {}


class SweepStopped(Exception):
    """Raised from the driver callback to end the Tune loop (cancel requested, lease lost)."""


class SweepCallback(Callback):
    """Driver-side: per-trial progress events, the job's fenced progress, cancel checks.

    Tune pickles the run config (with its callbacks) into the experiment folder and a restored
    Tuner uses that copy, so this object holds only the job id and finds the live attempt's
    context (lease token, Redis) in ``LIVE``.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def __getstate__(self) -> dict[str, Any]:
        return {"job_id": self.job_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.job_id = state["job_id"]

    @property
    def live(self) -> Live | None:
        return LIVE.get(self.job_id)

    def _publish(self, trial: Any, status: str, **extra: Any) -> None:
        live = self.live
        if live is None:
            return
        t = trial.config["trial"]
        event = {"type": "trial", "trial": t["key"], "model": t["model"], "augment": t["augment"], "lr": t["lr"],
                 "routing_iters": t["routing_iters"], "seed": t["seed"], "status": status, **extra}
        try:
            live.queue.events.publish(self.job_id, "progress", event, lease_token=live.ctx.lease_token)
            if status != "running" or extra.get("epoch") is not None:
                self.report_progress(live, last=event)
        except Exception:  # a Redis blip must not kill the sweep; the next event catches up
            log.exception("tune progress for %s failed", self.job_id)

    def report_progress(self, live: Live, last: dict[str, Any] | None = None) -> None:
        best = max(live.last_val.items(), key=lambda kv: kv[1], default=None)
        live.queue.report_progress(self.job_id, live.ctx.lease_token, {
            "type": "tune", "trials": live.total, "trials_done": len(live.done), "trials_running": len(live.running),
            "best_val_accuracy": best[1] if best else None, "best_trial": best[0] if best else None,
            "last": last}, publish=False)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        live = self.live
        if live is not None:
            reason = live.channel.stop_reason()  # throttled to once a second
            if reason is not None:
                raise SweepStopped(reason)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        live = self.live
        if live is not None:
            key = trial.config["trial"]["key"]
            live.running.add(key)
            live.starts[key] = live.starts.get(key, 0) + 1
        self._publish(trial, "started")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        live = self.live
        if result.get("final"):
            return  # reported by on_trial_complete
        if live is not None and result.get("val_accuracy") is not None:
            live.last_val[trial.config["trial"]["key"]] = float(result["val_accuracy"])
        if live is not None and live.runs is not None:
            try:  # the trial's MLflow curve grows as it trains; MLflow errors are the tracker's to count
                live.runs.epoch(trial.config["trial"], result)
            except Exception:
                log.exception("MLflow logging of a trial of %s failed", self.job_id)
        self._publish(trial, "running", epoch=result.get("epoch"), epochs=result.get("epochs"),
                      val_accuracy=result.get("val_accuracy"), train_loss=result.get("train_loss"),
                      epoch_seconds=result.get("epoch_seconds"), early_stop=bool(result.get("done")))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        live = self.live
        result = trial.last_result or {}
        key = trial.config["trial"]["key"]
        if result.get("final"):
            status = "restored" if result.get("restored") else "finished"
        else:
            status = "early_stopped"
        if live is not None:
            live.running.discard(key)
            live.done.add(key)
            if result.get("val_accuracy") is not None:
                live.last_val[key] = float(result["val_accuracy"])
        self._publish(trial, status, epoch=result.get("epoch"), epochs=result.get("epochs"),
                      val_accuracy=result.get("val_accuracy"), rotation_accuracy=result.get("rotation_accuracy"))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        live = self.live
        if live is not None:
            live.running.discard(trial.config["trial"]["key"])
        error = getattr(trial, "error_file", None)
        self._publish(trial, "error", error_file=str(error) if error else None)
