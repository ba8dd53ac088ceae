"""Tune jobs: a robustness study (models × training augmentations × lr × routing × seeds) on Ray Tune.

One Tune trial per combination, expanded up front by ``expand_trials`` (a deterministic list,
so every attempt of a job names the same trials the same way). A trial is a function
trainable (``_trial``) that trains with ``capsnet_core.fit``, reports the upright test
accuracy after every epoch (``val_accuracy``, the ASHA metric) through ``ray.tune.report``,
and at the end evaluates the test set rotated by every eval angle. With
``gpus_per_trial > 1`` the trial drives a Ray Train ``TorchTrainer`` (one GPU rank each)
instead of training in its own process.

Storage: ``RunConfig(storage_path=<artifacts>, name=<job id>-tune)``. Each trial also keeps
its own state at a fixed place in that experiment folder, ``trials/<trial key>/``:
``checkpoint.pt`` (the last epoch, a ``capsnet_core`` checkpoint, replaced after every epoch)
and ``final.json`` (the finished trial's measurements). Why not only Tune's checkpoints:
Tune snapshots its experiment state every 10 s or more, so after a SIGKILL the restored
state can name a checkpoint one or more epochs old (or one already deleted), and can list a
trial that had finished as still running. A trial therefore resumes from the newest of its own
files, and a trial whose ``final.json`` exists re-reports it without training or evaluating.

Resume: a later attempt of the same job finds the experiment (``Tuner.can_restore``) and
restores it with ``resume_errored=True``: finished trials are not rerun, unfinished and
errored ones continue from their last epoch.

Progress and cancel: ``_SweepCallback`` runs in the driver (the worker process). It publishes
a ``{"type": "trial", ...}`` progress event per trial start, epoch and end, keeps a fenced
``{"type": "tune", "trials": N, "trials_done": k}`` in the job record, and once a second
checks the job record: on a cancel request (or a lost lease) it aborts the Tune loop, which
stops every trial actor; ``run_tune_job`` then raises ``JobCancelled``. Trials check the
record too, between steps, so they stop within a step even before the driver notices.

Early stopping (``asha``): ASHA on ``val_accuracy`` over epochs, used only when the search
has hyperparameter alternatives (several lr values, routing_iters values or samples); with a
plain grid of conditions every trial is a cell of the matrix and none is stopped. Trials that
ASHA stopped are still evaluated at every eval angle from their last checkpoint (a Ray task
each) and are marked ``early_stopped`` with the epochs they trained.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray.tune import Callback

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.train import angle_key, ddp_options

from .jobspec import TuneSpec, model_config_fields
from .queue import JobQueue
from .ray_train import (
    CHECKPOINT_FILE,
    AttemptLost,
    JobCancelled,
    JobChannel,
    JobContext,
    assigned_device,
    check_job_limits,
    describe_error,
    evaluate_checkpoint,
    infrastructure_loss,
    process_gone,
)

log = logging.getLogger("capsctl.tune")

DEFAULT_LR = 1e-3
LR_RANGE = (1e-4, 3e-3)  # log-uniform lr samples when samples > 1 and no lr grid is given
FINAL_FILE = "final.json"
TRIALS_DIR = "trials"


# ----------------------------------------------------------------------------- the search space


def expand_trials(spec: TuneSpec) -> list[dict[str, Any]]:
    """Every trial of the study, in a fixed order: model × condition × lr × routing × seed × sample.

    lr: the spec's grid; else, with samples > 1, one log-uniform sample per sample index
    (drawn from ``spec.seed``, shared by all models and conditions so rows compare like with
    like); else 1e-3. When lr is a grid (or there is one sample), samples repeat the grid with
    further seeds.
    """
    rng = random.Random(spec.seed)
    sampled_lr = spec.lr is None and spec.samples > 1
    lr_samples = [math.exp(rng.uniform(math.log(LR_RANGE[0]), math.log(LR_RANGE[1])))
                  for _ in range(spec.samples)] if sampled_lr else []
    trials: list[dict[str, Any]] = []
    for model in spec.models:
        base = spec.model_kwargs(model)
        default_routing = base.get("routing_iters", model_config_fields(model).get("routing_iters"))
        routing_grid: list[int | None] = (list(spec.routing_iters) if model == "capsnet" and spec.routing_iters
                                          else [default_routing if model == "capsnet" else None])
        for angle, augment in spec.conditions():
            for sample in range(spec.samples):
                lrs = [lr_samples[sample]] if sampled_lr else list(spec.lr or [DEFAULT_LR])
                for lr in lrs:
                    for routing in routing_grid:
                        for s in range(spec.seeds):
                            seed = spec.seed + s + (0 if sampled_lr else sample * spec.seeds)
                            index = len(trials)
                            r = f"-r{routing}" if routing is not None else ""
                            trials.append({
                                "index": index, "key": f"t{index:03d}-{model}-{augment}-lr{lr:.3g}{r}-s{seed}",
                                "model": model, "augment": augment, "train_angle": float(angle),
                                "lr": float(lr), "routing_iters": routing, "seed": seed, "sample": sample,
                            })
    return trials


def _model_kwargs(spec: TuneSpec, trial: dict[str, Any]) -> dict[str, Any]:
    kwargs = spec.model_kwargs(trial["model"])
    if trial["model"] == "capsnet" and trial.get("routing_iters") is not None:
        kwargs["routing_iters"] = trial["routing_iters"]
    return kwargs


def _train_config(spec: TuneSpec, trial: dict[str, Any]) -> TrainConfig:
    return TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=trial["lr"], augment=trial["augment"],
                       seed=trial["seed"], eval_angles=tuple(spec.eval_angles or spec.angles),
                       eval_suites=tuple(spec.eval_suites))


def _has_alternatives(spec: TuneSpec) -> bool:
    """Does the search pick among hyperparameters (so early stopping has something to drop)?"""
    return bool((spec.lr and len(spec.lr) > 1) or (spec.routing_iters and len(spec.routing_iters) > 1)
                or spec.samples > 1)


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]["key"]


# ----------------------------------------------------------------------------- per-trial storage


def _is_uri(path: str) -> bool:
    return "://" in path


def experiment_path(ctx: JobContext) -> str:
    base = ctx.artifacts if _is_uri(ctx.artifacts) else os.path.abspath(os.path.expanduser(ctx.artifacts))
    return f"{base.rstrip('/')}/{ctx.job_id}-tune"


class TrialStore:
    """``<experiment>/trials/<key>/``: a trial's last checkpoint and final result (local or a URI)."""

    def __init__(self, experiment: str, key: str) -> None:
        import pyarrow.fs as pafs

        self.uri = f"{experiment}/{TRIALS_DIR}/{key}"
        if _is_uri(self.uri):
            self.fs, self.path = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), self.uri

    @property
    def checkpoint_uri(self) -> str:
        """What ``load_model`` / ``capsctl eval`` take: the file locally, else the folder URI."""
        return f"{self.uri}/{CHECKPOINT_FILE}" if not _is_uri(self.uri) else self.uri

    def _exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def _put(self, name: str, source: Path | None = None, data: bytes | None = None) -> None:
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
        self._put(CHECKPOINT_FILE, source=local)

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
        self._put(FINAL_FILE, data=json.dumps(document, sort_keys=True).encode())


# ----------------------------------------------------------------------------- the trial


def _epoch_metrics(record: dict[str, Any], epochs: int) -> dict[str, Any]:
    return {"epoch": record["epoch"], "epochs": epochs, "val_accuracy": record.get("test_accuracy"),
            "train_loss": record.get("train_loss"), "train_accuracy": record.get("train_accuracy"),
            "epoch_seconds": record.get("epoch_seconds"), "images_per_second": record.get("images_per_second")}


def _final_document(trial: dict[str, Any], spec: TuneSpec, history: list[dict[str, Any]],
                    rotation: dict[str, float], per_class: dict[str, list[float]], status: str,
                    device: str, world_size: int = 1, suites: dict[str, float] | None = None) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {**trial, "status": status, "epochs": spec.epochs, "epochs_trained": int(last.get("epoch", 0)),
            "val_accuracy": last.get("test_accuracy"), "rotation_accuracy": rotation, "per_class": per_class,
            "suite_accuracy": dict(suites or {}),
            "history": [{k: v for k, v in h.items() if k not in ("per_class", "rotation_accuracy", "suite_accuracy")}
                        for h in history],
            "train_seconds": sum(h.get("epoch_seconds") or 0.0 for h in history),
            "device": device, "world_size": world_size, "finished_at": time.time()}


def _report_final(document: dict[str, Any], restored: bool, checkpoint: str) -> None:
    import ray.tune

    last = document["history"][-1] if document["history"] else {"epoch": document["epochs_trained"]}
    ray.tune.report({**_epoch_metrics(last, document["epochs"]), "final": True, "restored": restored,
                     "rotation_accuracy": document["rotation_accuracy"], "checkpoint": checkpoint})


def _publish_resumed(channel: JobChannel, job: JobContext, trial: dict[str, Any], checkpoint: Path,
                     epochs: int) -> None:
    epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    channel.events.publish(job.job_id, "progress", {
        "type": "trial", "trial": trial["key"], "model": trial["model"], "augment": trial["augment"],
        "status": "resumed", "resumed_from_epoch": epoch, "epochs": epochs}, lease_token=job.lease_token)


def _trial(config: dict[str, Any], spec: dict[str, Any] | None = None, ctx: dict[str, Any] | None = None,
           experiment: str = "", ranks: int = 1, use_gpu: bool = False) -> None:
    """One Tune trial (a function trainable); static arguments come through ``tune.with_parameters``."""
    import ray.tune

    trial = config["trial"]
    tune_spec = TuneSpec.model_validate(spec)
    job = JobContext(**ctx)
    store = TrialStore(experiment, trial["key"])
    channel = JobChannel(job)
    done = store.final()
    if done is not None:  # finished in an earlier attempt: report it again, train nothing
        _report_final(done, restored=True, checkpoint=store.checkpoint_uri)
        return
    if ranks > 1:
        _run_distributed_trial(tune_spec, trial, job, experiment, ranks, use_gpu)
        return

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    workdir = Path(tempfile.mkdtemp(prefix=f"capsctl-{job.job_id}-{trial['index']:03d}-"))
    try:
        resume = store.fetch_checkpoint(workdir / "resume" / CHECKPOINT_FILE)
        if resume is not None:
            _publish_resumed(channel, job, trial, resume, tune_spec.epochs)
        torch.manual_seed(trial["seed"])
        model = build_model(trial["model"], **_model_kwargs(tune_spec, trial)).to(device)
        train = load_dataset(tune_spec.dataset, "train", root=job.data_dir).subset(tune_spec.train_subset)
        test = load_dataset(tune_spec.dataset, "test", root=job.data_dir).subset(tune_spec.test_subset)
        local_ckpt = workdir / "epoch" / CHECKPOINT_FILE

        def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
            record = history[-1]
            if saved is not None:
                store.put_checkpoint(saved)
            if record["epoch"] >= tune_spec.epochs:
                return  # the last epoch is reported below, with its rotation accuracies
            ray.tune.report(_epoch_metrics(record, tune_spec.epochs))

        result = fit(model, train, test, _train_config(tune_spec, trial), checkpoint_path=local_ckpt,
                     resume_from=resume, on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        document = _final_document(trial, tune_spec, result.history, result.rotation_accuracy, result.per_class,
                                   "finished", str(device), suites=result.suite_accuracy)
        store.put_final(document)
        _report_final(document, restored=False, checkpoint=store.checkpoint_uri)
    finally:
        # TrainingStopped (cancel, lost lease) propagates: the trial ends as errored, so a later
        # attempt of the job (resume_errored) continues it from its last epoch.
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------- gpus_per_trial > 1: Ray Train inside a trial


def _distributed_worker_loop(config: dict[str, Any]) -> None:
    """Each rank of a trial's TorchTrainer; rank 0 keeps the trial's store up to date."""
    import ray.train
    import ray.train.torch

    spec = TuneSpec.model_validate(config["spec"])
    trial = config["trial"]
    job = JobContext(**config["ctx"])
    store = TrialStore(config["experiment"], trial["key"])
    channel = JobChannel(job)
    train_ctx = ray.train.get_context()
    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    workdir = Path(tempfile.mkdtemp(prefix=f"capsctl-{job.job_id}-{trial['index']:03d}-r{rank}-"))
    try:
        resume = store.fetch_checkpoint(workdir / "resume" / CHECKPOINT_FILE)
        if resume is not None and rank == 0:
            _publish_resumed(channel, job, trial, resume, spec.epochs)
        torch.manual_seed(trial["seed"])
        model = build_model(trial["model"], **_model_kwargs(spec, trial))
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(model))
        train = load_dataset(spec.dataset, "train", root=job.data_dir).subset(spec.train_subset)
        test = load_dataset(spec.dataset, "test", root=job.data_dir).subset(spec.test_subset) if rank == 0 else None

        def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
            if rank == 0 and saved is not None:
                store.put_checkpoint(saved)
            if history[-1]["epoch"] < spec.epochs:
                ray.train.report(_epoch_metrics(history[-1], spec.epochs))  # a barrier on every rank

        result = fit(model, train, test, _train_config(spec, trial), rank=rank, world_size=world_size,
                     checkpoint_path=workdir / "epoch" / CHECKPOINT_FILE if rank == 0 else None,
                     resume_from=resume, on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        metrics: dict[str, Any] = {}
        if rank == 0:
            document = _final_document(trial, spec, result.history, result.rotation_accuracy, result.per_class,
                                       "finished", str(device), world_size, suites=result.suite_accuracy)
            store.put_final(document)
            last = document["history"][-1]
            metrics = {**_epoch_metrics(last, spec.epochs), "final": True, "restored": False,
                       "rotation_accuracy": document["rotation_accuracy"], "checkpoint": store.checkpoint_uri}
        ray.train.report(metrics)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_distributed_trial(spec: TuneSpec, trial: dict[str, Any], job: JobContext, experiment: str,
                           ranks: int, use_gpu: bool) -> None:
    """Train one trial with a TorchTrainer of ``ranks`` ranks; its reports reach Tune via TuneReportCallback."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _distributed_worker_loop,
        train_loop_config={"spec": spec.to_dict(), "trial": trial, "ctx": asdict(job), "experiment": experiment},
        scaling_config=ScalingConfig(num_workers=ranks, use_gpu=use_gpu,
                                     # the trial actor holds the CPU; the ranks hold one GPU each
                                     resources_per_worker={"GPU": 1, "CPU": 0} if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=f"{trial['key']}-ddp-{uuid.uuid4().hex[:6]}", storage_path=f"{experiment}/ddp",
                             failure_config=FailureConfig(max_failures=0), callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ----------------------------------------------------------------------------- the driver side


@dataclass
class _Live:
    """What the driver callback needs in this process (looked up by job id, never pickled)."""

    ctx: JobContext
    queue: JobQueue
    channel: JobChannel
    total: int
    done: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    last_val: dict[str, float] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)


_LIVE: dict[str, _Live] = {}


class SweepStopped(Exception):
    """Raised from the driver callback to end the Tune loop (cancel requested, lease lost)."""


class _SweepCallback(Callback):
    """Driver-side: per-trial progress events, the job's fenced progress, cancel checks.

    Tune pickles the run config (with its callbacks) into the experiment folder and a restored
    Tuner uses that copy, so this object holds only the job id and finds the live attempt's
    context (lease token, Redis) in ``_LIVE``.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def __getstate__(self) -> dict[str, Any]:
        return {"job_id": self.job_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.job_id = state["job_id"]

    @property
    def live(self) -> _Live | None:
        return _LIVE.get(self.job_id)

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
                self._progress(live, last=event)
        except Exception:  # a Redis blip must not kill the sweep; the next event catches up
            log.exception("tune progress for %s failed", self.job_id)

    def _progress(self, live: _Live, last: dict[str, Any] | None = None) -> None:
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


def _restorable(path: str) -> bool:
    """A Tuner was created there *and* it saved an experiment snapshot (else start it afresh)."""
    from ray.tune import Tuner

    if not Tuner.can_restore(path):
        return False
    import pyarrow.fs as pafs

    fs, root = (pafs.FileSystem.from_uri(path) if _is_uri(path) else (pafs.LocalFileSystem(), path))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return any(Path(i.path).name.startswith("experiment_state") for i in infos)


def _build_trainable(spec: TuneSpec, ctx: JobContext, experiment: str) -> Any:
    from ray import tune

    ranks = spec.gpus_per_trial if spec.gpus_per_trial > 1 else 1
    use_gpu = spec.gpus_per_trial > 0
    ctx_dict = asdict(ctx)
    if ctx_dict.get("data_dir"):
        ctx_dict["data_dir"] = os.path.abspath(os.path.expanduser(ctx_dict["data_dir"]))  # trials chdir
    trainable = tune.with_parameters(_trial, spec=spec.to_dict(), ctx=ctx_dict, experiment=experiment,
                                     ranks=ranks, use_gpu=use_gpu)
    # gpus_per_trial > 1: the trial only drives a TorchTrainer whose ranks hold the GPUs.
    resources = {"cpu": 1, "gpu": spec.gpus_per_trial} if ranks == 1 else {"cpu": 1}
    return tune.with_resources(trainable, resources)


def _make_tuner(spec: TuneSpec, ctx: JobContext, trials: list[dict[str, Any]], experiment: str,
                finished: set[str]) -> tuple[Any, str]:
    """Restore the job's Tune experiment if an earlier attempt saved one, else start one over the
    trials not finished yet (None when there are none)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = _build_trainable(spec, ctx, experiment)
    if _restorable(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner, "restored"
    trials = [t for t in trials if t["key"] not in finished]
    if not trials:
        return None, "nothing left to run"
    scheduler, metric, mode = None, None, None
    if spec.asha and _has_alternatives(spec) and spec.epochs > 1:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.epochs, grace_period=max(1, spec.epochs // 5),
                                  reduction_factor=3)
        metric, mode = "val_accuracy", "max"
    storage_path, name = experiment.rsplit("/", 1)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, scheduler=scheduler, metric=metric,
                                    mode=mode, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_SweepCallback(ctx.job_id)]),
    )
    return tuner, "new"


def _eval_checkpoint_task(checkpoint: str, spec_dict: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """Evaluate an (early-stopped) trial's last checkpoint at every eval angle."""
    spec = TuneSpec.model_validate(spec_dict)
    return evaluate_checkpoint(checkpoint, spec.dataset, spec.eval_angles or spec.angles, spec.test_subset, data_dir,
                               spec.eval_suites, device=assigned_device())


def _evaluate_unfinished(spec: TuneSpec, ctx: JobContext, experiment: str, pending: list[dict[str, Any]],
                         channel: JobChannel) -> None:
    """Trials that ASHA stopped: measure their last checkpoint at every angle; store it as their final."""
    import ray

    if not pending:
        return
    task = ray.remote(num_cpus=1, num_gpus=1 if spec.gpus_per_trial > 0 else 0)(_eval_checkpoint_task)
    data_dir = os.path.abspath(os.path.expanduser(ctx.data_dir)) if ctx.data_dir else None
    refs = {}
    for trial in pending:
        store = TrialStore(experiment, trial["key"])
        refs[task.remote(store.checkpoint_uri, spec.to_dict(), data_dir)] = (trial, store)
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
        if channel.stop_reason() is not None:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise JobCancelled(channel.stop_reason())
        for ref in ready:
            trial, store = refs[ref]
            measured = ray.get(ref)
            document = _final_document(trial, spec, measured["history"], measured["rotation_accuracy"], measured["per_class"],
                                       "early_stopped", measured["device"], suites=measured.get("suite_accuracy"))
            store.put_final(document)


# ----------------------------------------------------------------------------- the result


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_matrix(spec: TuneSpec, finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: rows = training augmentation, columns = test angle, cells = mean/std/n over seeds.

    With several hyperparameter configs (lr, routing_iters) for a row, the row shows the config
    with the best mean final upright val accuracy over its seeds (``selected``), so the cells
    are not picked by the very numbers they report.
    """
    angle_cols = [angle_key(a) for a in spec.eval_angles or spec.angles]
    # The suites' one-number summaries (rotation AUC, affine accuracy) as extra columns after the angles.
    suite_cols = sorted({k for f in finals for k in (f.get("suite_accuracy") or {})},
                        key=lambda k: (k != "rotation_auc", k))
    cols = angle_cols + suite_cols
    rows = [augment for _, augment in spec.conditions()]
    models: dict[str, Any] = {}
    for model in spec.models:
        mine = [f for f in finals if f["model"] == model]
        mean, std, n, early, selected = [], [], [], [], []
        for row in rows:
            configs: dict[tuple[float, Any], list[dict[str, Any]]] = {}
            for f in mine:
                if f["augment"] == row:
                    configs.setdefault((f["lr"], f["routing_iters"]), []).append(f)
            if not configs:
                mean.append([None] * len(cols))
                std.append([None] * len(cols))
                n.append([0] * len(cols))
                early.append([0] * len(cols))
                selected.append(None)
                continue
            (lr, routing), group = max(configs.items(), key=lambda kv: statistics.fmean(
                [g.get("val_accuracy") or 0.0 for g in kv[1]]))
            selected.append({"lr": lr, "routing_iters": routing, "seeds": sorted(g["seed"] for g in group)})
            mrow, srow, nrow, erow = [], [], [], []
            for col in cols:
                values = [float(source[col]) for g in group
                          for source in (g.get("rotation_accuracy") or {}, g.get("suite_accuracy") or {})
                          if col in source]
                mu, sd = _mean_std(values)
                mrow.append(mu)
                srow.append(sd)
                nrow.append(len(values))
                erow.append(sum(1 for g in group if g.get("status") == "early_stopped"))
            mean.append(mrow)
            std.append(srow)
            n.append(nrow)
            early.append(erow)
        best_by_col = {}
        for j, col in enumerate(cols):
            cands = [(mean[i][j], rows[i]) for i in range(len(rows)) if mean[i][j] is not None]
            if cands:
                best_by_col[col] = max(cands)[1]
        scored = [f for f in mine if f.get("rotation_accuracy")]
        best = max(scored, key=lambda f: statistics.fmean(f["rotation_accuracy"].values()), default=None)
        models[model] = {
            "rows": rows, "cols": cols, "mean": mean, "std": std, "n": n, "early_stopped": early,
            "selected": selected, "best_by_col": best_by_col,
            "best_checkpoint": best["checkpoint"] if best else None,
            "best_trial": None if best is None else {
                "trial": best["key"], "augment": best["augment"], "lr": best["lr"],
                "routing_iters": best["routing_iters"], "seed": best["seed"], "epochs_trained": best["epochs_trained"],
                "rotation_accuracy": best["rotation_accuracy"],
                "accuracy": statistics.fmean(best["rotation_accuracy"].values()),
            },
        }
    return models


def write_artifacts(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """CSV (one row per cell), the whole result as JSON and a heatmap PNG per model."""
    from capsnet_core.plots import plot_robustness_heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "tune_matrix.csv", out_dir / "tune_result.json"
    heatmaps = {}
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "augment", "test_angle", "mean_accuracy", "std", "n", "early_stopped",
                         "best_in_column", "lr", "routing_iters"])
        for model, m in result["models"].items():
            for i, row in enumerate(m["rows"]):
                sel = m["selected"][i] or {}
                for j, col in enumerate(m["cols"]):
                    writer.writerow([model, row, col, m["mean"][i][j], m["std"][i][j], m["n"][i][j],
                                     m["early_stopped"][i][j], m["best_by_col"].get(col) == row, sel.get("lr"),
                                     sel.get("routing_iters")])
    for model, m in result["models"].items():
        grid = [[float("nan") if v is None else v for v in row] for row in m["mean"]]
        heatmaps[model] = str(plot_robustness_heatmap(grid, m["rows"], m["cols"], out_dir / f"heatmap-{model}.png",
                                                      title=f"{model}: test accuracy (%) by training augmentation"))
    artifacts = {"csv": str(csv_path), "json": str(json_path), "heatmaps": heatmaps}
    json_path.write_text(json.dumps({**result, "artifacts": artifacts}, indent=2, sort_keys=True))
    return artifacts


# ----------------------------------------------------------------------------- entry point


def trial_loss(error: BaseException | str | None) -> str | None:
    """Why a trial's error (as Tune's result grid reports it) is an infrastructure loss, or None
    when it is the trial's own error.

    Tune records what failed the trial's actor task: a ``RayTaskError`` when the trainable raised
    (an instance of the cause's class too, so a user's own ``ActorDiedError`` is one), a bare
    ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``) when the trial's actor is
    gone, e.g. with its node; without a picklable error, only its text. A trial that drives its
    own Ray Train run (``gpus_per_trial > 1``) raised that run's ``WorkerGroupError`` /
    ``ControllerError``: a loss when its ranks were (see ``infrastructure_loss``)."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if not isinstance(error, BaseException):
        return None
    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        return infrastructure_loss(cause) if isinstance(cause, WorkerGroupError | ControllerError) else None
    return describe_error(error) if process_gone(error) else None


def run_tune_job(spec: TuneSpec, ctx: JobContext, queue: JobQueue) -> dict[str, Any]:
    """Run (or resume) a tune job on the connected Ray cluster; returns its result document."""
    import signal
    import threading

    check_job_limits(spec)
    trials = expand_trials(spec)
    experiment = experiment_path(ctx)
    channel = JobChannel(ctx)
    live = _Live(ctx=ctx, queue=queue, channel=channel, total=len(trials))
    for t in trials:
        if TrialStore(experiment, t["key"]).final() is not None:
            live.done.add(t["key"])
    _LIVE[ctx.job_id] = live
    callback = _SweepCallback(ctx.job_id)
    tuner, how = _make_tuner(spec, ctx, trials, experiment, set(live.done))
    what = {"restored": "restoring the Tune experiment", "new": "new Tune experiment"}.get(how, how)
    queue.events.log(ctx.job_id, f"tune: {len(trials)} trials, {len(live.done)} already finished; {what} at "
                     f"{experiment}", trials=len(trials), finished=len(live.done), restored=how == "restored",
                     experiment=experiment, lease_token=ctx.lease_token)
    callback._progress(live)
    # Tune installs SIGINT/SIGUSR1 handlers when run from the main thread; keep the worker's own.
    saved_handlers = ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
                      if threading.current_thread() is threading.main_thread() else {})
    # TUNE_DISABLE_SIGINT_HANDLER: Ctrl-C on a worker finishes the job, it does not cut it.
    # RAY_AIR_NEW_OUTPUT=0: Tune's new console reporter prints its "Configuration for experiment"
    # box and "View detailed results here" even with RunConfig(verbose=0); the legacy reporter
    # honours verbose=0 and prints nothing. The job's own events already say what runs.
    tune_env = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    previous_env = {name: os.environ.get(name) for name in tune_env}
    os.environ.update(tune_env)
    try:
        grid = tuner.fit() if tuner is not None else []
    except Exception as exc:
        reason = channel.stop_reason()
        if reason is not None:
            raise JobCancelled(reason) from exc
        if process_gone(exc):
            raise AttemptLost(f"the Tune run lost a Ray process or node ({describe_error(exc)})") from exc
        raise
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _LIVE.pop(ctx.job_id, None)
    reason = channel.stop_reason()
    if reason is not None:
        raise JobCancelled(reason)

    by_key = {t["key"]: t for t in trials}
    errors: dict[str, str] = {}
    losses: dict[str, str] = {}
    for res in grid:
        key = (res.config or {}).get("trial", {}).get("key")
        if key is None:
            continue
        if res.error is not None:
            errors[key] = f"{type(res.error).__name__}: {res.error}".splitlines()[0][:300]
            lost = trial_loss(res.error)
            if lost is not None:
                losses[key] = lost
    stores = {k: TrialStore(experiment, k) for k in by_key}
    missing = [k for k in by_key if stores[k].final() is None]
    failed = [k for k in missing if k in errors or not stores[k].has_checkpoint()]
    lost_trials = [k for k in failed if k in losses]
    if lost_trials and not any(k in errors and k not in losses for k in failed):
        # Not the job's fault: back to the queue (max_lost); the next attempt resumes these trials.
        raise AttemptLost(f"{len(lost_trials)} of {len(trials)} tune trials lost their Ray actor or node "
                          f"({lost_trials[0]}: {losses[lost_trials[0]]})")
    if failed:
        first = next((errors[k] for k in failed if k in errors), "no checkpoint")
        raise RuntimeError(f"{len(failed)} of {len(trials)} tune trials did not finish ({failed[0]}: {first}); "
                           f"a retry resumes them, finished trials are kept")
    pending = [by_key[k] for k in missing]
    _evaluate_unfinished(spec, ctx, experiment, pending, channel)

    finals = []
    for key in by_key:
        document = stores[key].final()
        if document is None:  # pragma: no cover - just written
            raise RuntimeError(f"trial {key} has no final result")
        document["checkpoint"] = stores[key].checkpoint_uri
        finals.append(document)
    models = build_matrix(spec, finals)
    result: dict[str, Any] = {
        "kind": "tune", "eval_angles": [angle_key(a) for a in spec.eval_angles or spec.angles],
        "experiment": experiment, "asha": bool(spec.asha and _has_alternatives(spec) and spec.epochs > 1),
        "models": models,
        "trials": [{k: f.get(k) for k in ("key", "model", "augment", "train_angle", "lr", "routing_iters", "seed",
                                          "status", "epochs_trained", "val_accuracy", "rotation_accuracy",
                                          "train_seconds", "checkpoint", "device", "world_size")}
                   for f in finals],
    }
    if not _is_uri(ctx.artifacts):
        out_dir = Path(os.path.expanduser(ctx.artifacts)).absolute() / ctx.job_id
        result["artifacts"] = write_artifacts(result, out_dir)
    else:
        result["artifacts"] = {}
    queue.report_progress(ctx.job_id, ctx.lease_token, {"type": "tune", "trials": len(trials),
                                                        "trials_done": len(trials), "trials_running": 0},
                          publish=False)
    return result
