"""Tune jobs: a robustness study (models × augmentations × lr × routing × seeds) on Ray Tune.

``run_tune_job`` expands the trials, runs (or restores) the Tune experiment, evaluates the
trials ASHA stopped and builds the result matrix; ``_trial`` is one trial. The design (storage,
resume, cancel, losses, early stopping) is in docs/architecture.md, *Tune jobs*.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsnet_core import TrainConfig, build_model, fit, load_dataset
from capsnet_core.train import angle_key
from capsnet_core.validation import describe_split, split_training_pool
from services.artifacts import is_uri
from services.queue.jobqueue import JobQueue
from services.results.tune_matrix import build_matrix, write_artifacts
from services.runs.evaluate import evaluate_checkpoint
from services.runs.losses import describe_error, process_gone, trial_loss
from services.runs.runtime import (
    CHECKPOINT_FILE,
    LEASE_LOST_REASON,
    AttemptLost,
    JobCancelled,
    JobChannel,
    JobContext,
    assigned_device,
    check_job_limits,
    fit_or_stop,
    prepare_ddp_model,
    stop_error,
)
from services.runs.sweep_tracking import SweepRuns
from services.runs.tracking import Tracker, spec_params, tracking_target
from services.runs.trial_store import TrialStore, experiment_path, final_document
from services.runs.tune_callback import LIVE, Live, SweepCallback
from services.spec.jobspec import TuneSpec
from services.spec.results import JobResult
from services.spec.tune_space import expand_trials, has_alternatives, trial_model_kwargs

# Tune pickles the run config, callbacks included, into the experiment folder: experiments saved
# before the callback moved to ``tune_callback`` name it here.
_SweepCallback = SweepCallback


def _train_config(spec: TuneSpec, trial: dict[str, Any]) -> TrainConfig:
    return TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=trial["lr"], augment=trial["augment"],
                       seed=trial["seed"], eval_angles=tuple(spec.eval_angles or spec.angles),
                       eval_suites=tuple(spec.eval_suites))




def _trial_name(trial: Any) -> str:
    return trial.config["trial"]["key"]


# ----------------------------------------------------------------------------- the trial


def _epoch_metrics(record: dict[str, Any], epochs: int) -> dict[str, Any]:
    return {"epoch": record["epoch"], "epochs": epochs, "val_accuracy": record.get("val_accuracy"),
            "train_loss": record.get("train_loss"), "train_accuracy": record.get("train_accuracy"),
            "epoch_seconds": record.get("epoch_seconds"), "images_per_second": record.get("images_per_second")}


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
        model = build_model(trial["model"], **trial_model_kwargs(tune_spec, trial)).to(device)
        train, val, _ = split_training_pool(load_dataset(tune_spec.dataset, "train", root=job.data_dir),
                                            tune_spec.val_split, tune_spec.train_subset)
        test = load_dataset(tune_spec.dataset, "test", root=job.data_dir).subset(tune_spec.test_subset)
        local_ckpt = workdir / "epoch" / CHECKPOINT_FILE

        def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
            record = history[-1]
            if saved is not None:
                store.put_checkpoint(saved)
            if record["epoch"] >= tune_spec.epochs:
                return  # the last epoch is reported below, with its rotation accuracies
            ray.tune.report(_epoch_metrics(record, tune_spec.epochs))

        result = fit(model, train, test, _train_config(tune_spec, trial), val=val, checkpoint_path=local_ckpt,
                     resume_from=resume, on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        document = final_document(trial, tune_spec, result.history, result.rotation_accuracy, result.per_class,
                                   "finished", str(device), suites=result.suite_accuracy,
                                   confusion=result.confusion)
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
        model = build_model(trial["model"], **trial_model_kwargs(spec, trial))
        model = prepare_ddp_model(model)
        train, val, _ = split_training_pool(load_dataset(spec.dataset, "train", root=job.data_dir), spec.val_split,
                                            spec.train_subset)
        test = load_dataset(spec.dataset, "test", root=job.data_dir).subset(spec.test_subset) if rank == 0 else None

        def on_epoch_end(history: list[dict[str, Any]], saved: Path | None) -> None:
            if rank == 0 and saved is not None:
                store.put_checkpoint(saved)
            if history[-1]["epoch"] < spec.epochs:
                ray.train.report(_epoch_metrics(history[-1], spec.epochs))  # a barrier on every rank

        result = fit(model, train, test, _train_config(spec, trial), val=val, rank=rank, world_size=world_size,
                     checkpoint_path=workdir / "epoch" / CHECKPOINT_FILE if rank == 0 else None,
                     resume_from=resume, on_epoch_end=on_epoch_end, should_stop=channel.should_stop)
        metrics: dict[str, Any] = {}
        if rank == 0:
            document = final_document(trial, spec, result.history, result.rotation_accuracy, result.per_class,
                                       "finished", str(device), world_size, suites=result.suite_accuracy,
                                       confusion=result.confusion)
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


def _restorable(path: str) -> bool:
    """A Tuner was created there *and* it saved an experiment snapshot (else start it afresh)."""
    from ray.tune import Tuner

    if not Tuner.can_restore(path):
        return False
    import pyarrow.fs as pafs

    fs, root = (pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return any(Path(i.path).name.startswith("experiment_state") for i in infos)


def _build_trainable(spec: TuneSpec, ctx: JobContext, experiment: str) -> Any:
    from ray import tune

    ranks = int(spec.gpus_per_trial) if spec.gpus_per_trial > 1 else 1
    use_gpu = spec.gpus_per_trial > 0
    ctx_dict = asdict(ctx)
    if ctx_dict.get("data_dir"):
        ctx_dict["data_dir"] = os.path.abspath(os.path.expanduser(ctx_dict["data_dir"]))  # trials chdir
    trainable = tune.with_parameters(_trial, spec=spec.to_dict(), ctx=ctx_dict, experiment=experiment,
                                     ranks=ranks, use_gpu=use_gpu)
    # gpus_per_trial > 1: the trial only drives a TorchTrainer whose ranks hold the GPUs.
    # A fraction (0.25) packs trials on one GPU: Ray places 1/fraction of them per card, and a
    # trial on a machine without CUDA (GPUs declared to Ray for tests) trains on the CPU.
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
    if spec.asha and has_alternatives(spec) and spec.epochs > 1:
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
                                  callbacks=[SweepCallback(ctx.job_id)]),
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
    # The same share of a GPU as a trial: a fraction stays a fraction, a DDP trial's eval gets one GPU.
    task = ray.remote(num_cpus=1, num_gpus=min(1, spec.gpus_per_trial))(_eval_checkpoint_task)
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
            raise stop_error(channel.stop_reason())
        for ref in ready:
            trial, store = refs[ref]
            measured = ray.get(ref)
            document = final_document(trial, spec, measured["history"], measured["rotation_accuracy"], measured["per_class"],
                                       "early_stopped", measured["device"], suites=measured.get("suite_accuracy"),
                                       confusion=measured.get("confusion"))
            store.put_final(document)


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _tune_process_settings() -> Iterator[None]:
    """What Tune would change in the worker's process while it runs, kept as the worker has it."""
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
        yield
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_trials(grid: Any, keys: list[str], stores: dict[str, TrialStore]) -> list[str]:
    """The trials left without a final result that a checkpoint lets finish here; raises when
    some failed: AttemptLost when Ray lost them (not the job's fault), else a one-line error."""
    errors: dict[str, str] = {}
    losses: dict[str, str] = {}
    for res in grid:
        key = (res.config or {}).get("trial", {}).get("key")
        if key is None or res.error is None:
            continue
        errors[key] = f"{type(res.error).__name__}: {res.error}".splitlines()[0][:300]
        lost = trial_loss(res.error)
        if lost is not None:
            losses[key] = lost
    missing = [k for k in keys if stores[k].final() is None]
    failed = [k for k in missing if k in errors or not stores[k].has_checkpoint()]
    lost_trials = [k for k in failed if k in losses]
    if lost_trials and not any(k in errors and k not in losses for k in failed):
        # back to the queue (max_lost); the next attempt resumes these trials
        raise AttemptLost(f"{len(lost_trials)} of {len(keys)} tune trials lost their Ray actor or node "
                          f"({lost_trials[0]}: {losses[lost_trials[0]]})")
    if failed:
        first = next((errors[k] for k in failed if k in errors), "no checkpoint")
        raise RuntimeError(f"{len(failed)} of {len(keys)} tune trials did not finish ({failed[0]}: {first}); "
                           f"a retry resumes them, finished trials are kept")
    return missing


TRIAL_FIELDS = ("key", "model", "augment", "train_angle", "lr", "routing_iters", "seed", "status",
                "epochs_trained", "val_accuracy", "rotation_accuracy", "train_seconds", "checkpoint",
                "device", "world_size")


def _sweep_result(spec: TuneSpec, ctx: JobContext, experiment: str, finals: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's result document: the model matrix (chosen on validation), every trial, artifacts."""
    validation = describe_split(load_dataset(spec.dataset, "train", root=ctx.data_dir), spec.val_split)
    result: dict[str, Any] = {
        "kind": "tune", "eval_angles": [angle_key(a) for a in spec.eval_angles or spec.angles],
        "experiment": experiment, "asha": bool(spec.asha and has_alternatives(spec) and spec.epochs > 1),
        "validation": validation.to_dict(), "models": build_matrix(spec, finals),
        "trials": [{k: f.get(k) for k in TRIAL_FIELDS} for f in finals],
    }
    if not is_uri(ctx.artifacts):
        result["artifacts"] = write_artifacts(result, Path(os.path.expanduser(ctx.artifacts)).absolute() / ctx.job_id)
    else:
        result["artifacts"] = {}
    return result


def run_tune_job(spec: TuneSpec, ctx: JobContext, queue: JobQueue) -> JobResult:
    """Run (or resume) a tune job on the connected Ray cluster; returns its result document."""
    check_job_limits(spec, ctx.max_params)
    channel = JobChannel(ctx)
    # The sweep's MLflow run opens first, so trials log their curves to it while they train.
    target = tracking_target(spec, ctx.job_id)
    runs = SweepRuns(Tracker.start(target, channel.warn, spec_params(spec.to_dict()))) if target else None
    try:
        result, finals = _run_sweep(spec, ctx, queue, channel, runs)
    except AttemptLost:
        raise  # the runs stay open: the next attempt continues them
    except JobCancelled as exc:
        if runs is not None and str(exc) != LEASE_LOST_REASON:  # else a newer attempt owns them
            runs.abandon("KILLED")
        raise
    except Exception:
        if runs is not None:
            runs.abandon("FAILED")
        raise
    if runs is not None:
        _finish_sweep_runs(runs, result, finals, channel)
    return JobResult.new(**result)  # (result carries kind="tune")


def _run_sweep(spec: TuneSpec, ctx: JobContext, queue: JobQueue, channel: JobChannel,
               runs: SweepRuns | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep itself: trials on Ray Tune, the unfinished ones evaluated; its result and the
    trials' final documents."""
    trials = expand_trials(spec)
    experiment = experiment_path(ctx)
    live = Live(ctx=ctx, queue=queue, channel=channel, total=len(trials), runs=runs)
    for t in trials:
        if TrialStore(experiment, t["key"]).final() is not None:
            live.done.add(t["key"])
    LIVE[ctx.job_id] = live
    callback = SweepCallback(ctx.job_id)
    tuner, how = _make_tuner(spec, ctx, trials, experiment, set(live.done))
    what = {"restored": "restoring the Tune experiment", "new": "new Tune experiment"}.get(how, how)
    queue.events.log(ctx.job_id, f"tune: {len(trials)} trials, {len(live.done)} already finished; {what} at "
                     f"{experiment}", trials=len(trials), finished=len(live.done), restored=how == "restored",
                     experiment=experiment, lease_token=ctx.lease_token)
    callback.report_progress(live)
    try:
        with _tune_process_settings():
            grid = fit_or_stop(tuner.fit if tuner is not None else list, channel, lost=lambda exc: (
                f"the Tune run lost a Ray process or node ({describe_error(exc)})" if process_gone(exc) else None))
    finally:
        LIVE.pop(ctx.job_id, None)

    by_key = {t["key"]: t for t in trials}
    stores = {k: TrialStore(experiment, k) for k in by_key}
    pending = _check_trials(grid, list(by_key), stores)
    _evaluate_unfinished(spec, ctx, experiment, [by_key[k] for k in pending], channel)

    finals = []
    for key in by_key:
        document = stores[key].final()
        if document is None:  # pragma: no cover - just written
            raise RuntimeError(f"trial {key} has no final result")
        document["checkpoint"] = stores[key].checkpoint_uri
        finals.append(document)
    result = _sweep_result(spec, ctx, experiment, finals)
    queue.report_progress(ctx.job_id, ctx.lease_token, {"type": "tune", "trials": len(trials),
                                                        "trials_done": len(trials), "trials_running": 0},
                          publish=False)
    return result, finals


def _finish_sweep_runs(runs: SweepRuns, result: dict[str, Any], finals: list[dict[str, Any]],
                       channel: JobChannel) -> None:
    """Every trial's results and end (their curves were logged as they trained), then the
    sweep's matrix files, heatmaps and each model's best checkpoint."""
    for document in finals:
        runs.final(document)
    sweep = runs.sweep
    artifacts = result.get("artifacts") or {}
    for path in [artifacts.get("csv"), artifacts.get("json"), *(artifacts.get("heatmaps") or {}).values()]:
        if path:
            sweep.log_artifact(path, "matrix")
    if not artifacts:
        sweep.log_json(result, "tune_result.json")
    for model, matrix in (result.get("models") or {}).items():  # each model's best trial, by validation
        best = matrix.get("best_checkpoint")
        if isinstance(best, str) and Path(best).is_file():
            sweep.log_artifact(best, f"best_checkpoint/{model}")
    sweep.finish()
    sweep.report_dropped(channel.log)
