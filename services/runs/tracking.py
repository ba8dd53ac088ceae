"""Experiment tracking in MLflow: one MLflow run per capsctl job (tune trials as child runs of
the sweep's run), logged by rank 0 of a train job or by the driver of an eval or tune job.

mlflow is an optional extra (``pip install capsctl[mlflow]``), imported only when a job names a
tracking URI. Tracking is a courtesy, like the plots: an MLflow that is down, refuses a call or
is not installed never fails a job. The first failure posts one warning event to the job's
stream; from then on every logging call of that run (and its children) is dropped without
touching the network, so a dead server costs one timeout, not one per epoch. ``finish`` posts
how many calls were dropped (``mlflow_dropped``), the job's own count of lost tracking data.

``TrackingTarget`` is plain data, so a driver can resolve it once and ship it to rank 0.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.config import Settings

DEFAULT_EXPERIMENT = "capsctl"
INSTALL_HINT = "pip install 'capsctl[mlflow]'"
# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by
# default: minutes of a training rank stalled on a dead server. One quick try instead.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_CHARS = 500  # MLflow limits a param value's length; a long list is cut, not refused

Warn = Callable[..., None]  # ``warn(message, **fields)``: posts a warning event to the job's stream


def mlflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


@dataclass(frozen=True)
class TrackingTarget:
    """Where and as what one job logs: the server, the experiment and the run's name and tags."""

    uri: str
    experiment: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)


def tracking_target(spec: Any, job_id: str, settings: Settings | None = None) -> TrackingTarget | None:
    """The job's target: the spec's ``mlflow_uri``, else the worker's ``CAPSNET_MLFLOW_URI``;
    None when neither names a server."""
    uri = getattr(spec, "mlflow_uri", None) or (settings or Settings.from_env()).mlflow_uri
    if not uri:
        return None
    name = getattr(spec, "name", None)
    tags = {"capsctl.job_id": job_id, "capsctl.kind": spec.kind, "capsctl.model": spec.label}
    if name:
        tags["capsctl.name"] = name
    user_tags = getattr(spec, "tags", None)  # the spec's own tags, where the spec has them
    if isinstance(user_tags, Mapping):
        tags.update({str(k): str(v) for k, v in user_tags.items()})
    return TrackingTarget(uri=uri, experiment=getattr(spec, "mlflow_experiment", None) or DEFAULT_EXPERIMENT,
                          run_name=name or job_id, tags=tags)


def spec_params(spec_dict: Mapping[str, Any]) -> dict[str, str]:
    """A job spec as MLflow params: scalars as text, lists and mappings as JSON."""
    out = {}
    for key, value in spec_dict.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        out[key] = text[:_MAX_PARAM_CHARS]
    return out


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """One history record's curve values: loss, train/val accuracy and loss, img/s, lr."""
    names = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second", "lr", "epoch_seconds")
    return {n: float(record[n]) for n in names if isinstance(record.get(n), int | float)}


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The final figures: ``rotation_accuracy/<angle>`` per test angle, ``suite/<name>`` per suite value."""
    out: dict[str, float] = {}
    for prefix, key in (("rotation_accuracy", "rotation_accuracy"), ("suite", "suite_accuracy")):
        values = result.get(key)
        if isinstance(values, Mapping):
            out.update({f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float)})
    return out


@dataclass
class _Health:
    """Shared by a run and its children: one warning per job, one drop count."""

    warn: Warn
    broken: bool = False
    dropped: int = 0


class Tracker:
    """One MLflow run. Every method swallows MLflow's errors (see the module doc)."""

    def __init__(self, target: TrackingTarget, health: _Health, client: Any = None, run_id: str | None = None,
                 experiment_id: str | None = None) -> None:
        self.target = target
        self._health = health
        self._client = client
        self.run_id = run_id
        self._experiment_id = experiment_id
        self.logged_steps: set[int] = set()  # epochs of the curve this run holds (a child found again)

    @classmethod
    def start(cls, target: TrackingTarget, warn: Warn, params: Mapping[str, str] | None = None,
              resume: bool = True) -> Tracker:
        """Open the job's run (the one an earlier attempt opened, when ``resume``) and log its params."""
        tracker = cls(target, _Health(warn))

        def open_run() -> None:
            for name, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            try:
                from mlflow.tracking import MlflowClient
            except ImportError:
                raise RuntimeError(f"mlflow is not installed on this worker ({INSTALL_HINT})") from None
            client = MlflowClient(tracking_uri=target.uri)
            experiment = client.get_experiment_by_name(target.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(target.experiment)
            run_id = tracker._earlier_run(client, experiment_id) if resume else None
            if run_id is None:
                run_id = client.create_run(experiment_id, run_name=target.run_name, tags=target.tags).info.run_id
            tracker._client, tracker.run_id, tracker._experiment_id = client, run_id, experiment_id

        if tracker._call(open_run, opens_run=True) and params:
            tracker.log_params(params)
        return tracker

    def _earlier_run(self, client: Any, experiment_id: str) -> str | None:
        """The unfinished run of an earlier attempt of this job: a retry continues its curves."""
        job_id = self.target.tags.get("capsctl.job_id")
        if not job_id:
            return None
        runs = client.search_runs([experiment_id], filter_string=f"tags.`capsctl.job_id` = '{job_id}' "
                                  "and attributes.status = 'RUNNING'", max_results=1000)
        # a sweep's open trial runs carry its job id too: the job's own run is the one without a parent
        return next((r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags), None)

    def child(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, str],
              resume: bool = False) -> Tracker:
        """A child run (a tune trial) under this one; shares its health. With ``resume``, the
        child of that name an earlier attempt opened, with the epochs it already holds."""
        child = Tracker(self.target, self._health, self._client, None, self._experiment_id)

        def open_child() -> None:
            if resume:
                found = self._client.search_runs(
                    [self._experiment_id], max_results=1,
                    filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.`mlflow.runName` = "
                                  f"'{run_name}'")
                if found:
                    child.run_id = found[0].info.run_id
                    child.logged_steps = {m.step for m in self._client.get_metric_history(child.run_id,
                                                                                          "train_loss")}
                    return
            run = self._client.create_run(self._experiment_id, run_name=run_name,
                                          tags={**self.target.tags, **tags, "mlflow.parentRunId": self.run_id})
            child.run_id = run.info.run_id

        if self.run_id is not None and child._call(open_child, opens_run=True):
            child.log_params(params)
        return child

    @property
    def dropped(self) -> int:
        return self._health.dropped

    def _call(self, fn: Callable[[], None], opens_run: bool = False) -> bool:
        """``fn()`` unless tracking already failed (or the run never opened); on its first
        failure, the job's one warning event."""
        if self._health.broken or (not opens_run and self.run_id is None):
            self._health.dropped += 1
            return False
        try:
            fn()
            return True
        except Exception as exc:  # any MLflow failure is the same: drop, never fail the job
            self._health.broken = True
            self._health.dropped += 1
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self._health.warn(f"MLflow tracking at {self.target.uri} failed, the job goes on without it: "
                              f"{type(exc).__name__}: {first}", mlflow_uri=self.target.uri)
            return False

    def log_params(self, params: Mapping[str, str]) -> None:
        items = list(params.items())

        def send() -> None:
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])

        self._call(send)

    def set_tag(self, key: str, value: str) -> None:
        self._call(lambda: self._client.set_tag(self.run_id, key, value))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not metrics:
            return

        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        self._call(send)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._call(lambda: self._client.log_artifact(self.run_id, str(path), folder))

    def log_json(self, document: Any, name: str) -> None:
        """A JSON document (the job's result) as an artifact file ``name``."""
        with tempfile.TemporaryDirectory(prefix="capsctl-mlflow-") as scratch:
            path = Path(scratch) / name
            path.write_text(json.dumps(document, indent=1, sort_keys=True, default=str))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run."""
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))

    def report_dropped(self, log: Callable[..., None]) -> None:
        """One event with the job's count of dropped tracking calls (nothing when none was)."""
        if self._health.dropped:
            log(f"MLflow: {self._health.dropped} tracking call(s) dropped", mlflow_dropped=self._health.dropped)
