"""Eval jobs: measure a trained checkpoint on the rotated test set (and the spec's suites) as one
Ray task, on a GPU when the spec asks for one. ``evaluate_checkpoint`` is also how a tune job
measures the trials that ASHA stopped early.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import traceback
from pathlib import Path
from typing import Any

import redis
import torch

from capsnet_core import load_dataset
from capsnet_core.checkpoint import load_checkpoint, model_from_checkpoint
from capsnet_core.evaluate import evaluate, evaluate_suites
from capsnet_core.train import angle_key
from services.queue.jobqueue import JobQueue
from services.runs.runtime import (
    CHECKPOINT_FILE,
    JobChannel,
    JobContext,
    JobRejected,
    assigned_device,
    stop_error,
)
from services.runs.tracking import Tracker, result_metrics, spec_params, tracking_target
from services.spec.jobspec import EvalSpec
from services.spec.results import JobResult
from services.spec.sources import SourceRefused, check_source_allowed

log = logging.getLogger("capsctl.eval")


def resolve_checkpoint(source: str, queue: JobQueue) -> str:
    """A checkpoint folder/URI from a job id (its last checkpoint) or a path given directly."""
    record = queue.get(source)
    if record is not None:
        if not record.checkpoint:
            raise ValueError(f"job {source} has no checkpoint yet (state {record.state})")
        return record.checkpoint
    return source


def evaluate_checkpoint(checkpoint_uri: str, dataset: str, angles: list[float], test_subset: int | None = None,
                        data_dir: str | None = None, suites: list[str] | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Load a capsnet_core checkpoint (a file, or a folder/URI holding checkpoint.pt) and measure
    its accuracy on the test set rotated by each angle, on `device` (``assigned_device()`` in a
    Ray task). The file is read with ``weights_only`` (``CheckpointRejected`` if unsafe)."""
    from ray.train import Checkpoint

    from capsnet_core.evaluate import configure_backends

    configure_backends(torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint_uri)
        if not path.is_file():
            Checkpoint(checkpoint_uri).to_directory(tmp)
            path = Path(tmp) / CHECKPOINT_FILE
        payload = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(payload, device)
    test = load_dataset(dataset, "test", root=data_dir).subset(test_subset)
    results = {angle_key(a): evaluate(model, test.images, test.labels, angle=a) for a in angles}
    rotation = {k: r.accuracy for k, r in results.items()}
    return {"checkpoint": checkpoint_uri, "model": model.name, "device": device, "history": list(payload["history"]),
            "rotation_accuracy": rotation, "per_class": {k: r.per_class for k, r in results.items()},
            "confusion": {k: r.confusion for k, r in results.items()},
            "suite_accuracy": evaluate_suites(model, test, suites or [], rotation, data_root=data_dir)}


def _eval_task(spec_dict: dict[str, Any], checkpoint_uri: str, data_dir: str | None) -> dict[str, Any]:
    spec = EvalSpec.model_validate(spec_dict)
    result = evaluate_checkpoint(checkpoint_uri, spec.dataset, spec.angles, spec.test_subset, data_dir,
                                 spec.eval_suites, device=assigned_device())
    result.pop("history")
    return result


def _wait_or_stop(running: Any, channel: JobChannel, poll_s: float = 1.0) -> None:
    """Wait for the eval task; past the time limit, on a cancel or a lost lease, kill it and raise
    why (``stop_error``), as a train or tune run stops."""
    import ray

    while not ray.wait([running], timeout=poll_s)[0]:
        reason = channel.stop_reason()
        if reason is not None:
            ray.cancel(running, force=True)  # the task holds its CPUs/GPU until it is killed
            raise stop_error(reason)


def run_eval_job(spec: EvalSpec, ctx: JobContext, queue: JobQueue) -> JobResult:
    """Evaluate a trained model on the rotated test set as a Ray task (on a GPU if the spec asks)."""
    import ray

    from capsnet_core.checkpoint import CheckpointRejected

    try:
        # The source and what a job id resolves to must both lie within the allowed roots.
        roots = ctx.eval_roots
        source = check_source_allowed(spec.source, ctx.artifacts, roots)
        checkpoint_uri = check_source_allowed(resolve_checkpoint(source, queue), ctx.artifacts, roots)
    except SourceRefused as err:
        raise JobRejected(str(err)) from None
    resources = spec.resources()
    task = ray.remote(num_cpus=max(1, resources.get("cpus", 1)), num_gpus=resources.get("gpus", 0))(_eval_task)
    running = task.remote(spec.to_dict(), checkpoint_uri, ctx.data_dir)
    _wait_or_stop(running, JobChannel(ctx))
    try:
        result = ray.get(running)
    except CheckpointRejected as exc:  # Ray re-raises the task's error as an instance of its cause
        raise JobRejected(str(getattr(exc, "cause", None) or exc)) from None
    except Exception as exc:
        raise RuntimeError(f"evaluation of {checkpoint_uri} failed: {exc}\n{traceback.format_exc()}") from exc
    # The same "eval" progress event a train job's final evaluation publishes: `logs -f` shows the
    # accuracies, and the worker's metrics loop exports them as the job's per-angle and suite gauges.
    # Only a view of the result: Redis away now must not fail an evaluation that is done.
    try:
        queue.events.publish(ctx.job_id, "progress",
                             {"type": "eval", "model": result["model"], "test_accuracy": result["rotation_accuracy"],
                              **({"suite_accuracy": result["suite_accuracy"]} if result.get("suite_accuracy") else {})},
                             lease_token=ctx.lease_token)
    except redis.RedisError as exc:
        log.warning("the eval result of %s was not published as an event: %s", ctx.job_id, exc)
    _track_eval(spec, ctx, queue, result)
    return JobResult.new("eval", **result)


def _track_eval(spec: EvalSpec, ctx: JobContext, queue: JobQueue, result: dict[str, Any]) -> None:
    """The eval job's MLflow run (the driver logs it): spec, per-angle and suite results."""
    target = tracking_target(spec, ctx.job_id)
    if target is None:
        return

    def log(message: str, **fields: Any) -> None:
        queue.events.log(ctx.job_id, message, lease_token=ctx.lease_token, **fields)

    # An eval spec names no model: the checkpoint does.
    target = dataclasses.replace(target, tags={**target.tags, "capsctl.model": str(result.get("model")),
                                               "capsctl.source": spec.source[:250]})
    tracker = Tracker.start(target, lambda message, **fields: log(message, level="warning", **fields),
                            spec_params(spec.to_dict()))
    tracker.log_metrics(result_metrics(result))
    tracker.log_json(result, "results.json")
    tracker.finish()
    tracker.report_dropped(log)
