"""The commands that submit jobs (submit, eval, tune) and read their outcome (results, compare),
plus ``models``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from capsnet_core.models.configs import MODEL_DESCRIPTIONS, MODEL_NAMES
from services.cli.follow import wait_and_report
from services.cli.helpers import App, SpecUsageError, UserError, command, echo, emit_json, pass_app
from services.cli.options import (
    NumberList,
    WordList,
    common_job_options,
    data_options,
    default_of,
    deprecated_alias,
    given,
    parse_model_config,
    training_job_options,
)
from services.cli.render import print_results, table, write_plots
from services.config import Settings
from services.results import compare as compare_mod
from services.spec.errors import SpecError
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec, check_model_size, parse_spec
from services.spec.sources import (
    SourceRefused,
    check_checkpoint_file,
    check_source_allowed,
    local_checkpoint_file,
)
from services.spec.types import JOB_ID_RE

SUITES_HELP = "Test suites: rotation (0-180° in 15° steps + AUC), affine (affine-MNIST or affNIST)."


def check_submittable(spec: Any, settings: Settings) -> None:
    """What only the operator's settings decide, checked before queueing (SpecError, exit 2):
    the model size limit, and for eval where the checkpoint may come from and, when it is a
    local file this process can read, that it is a safe capsnet_core checkpoint."""
    check_model_size(spec, settings.max_params)
    if isinstance(spec, EvalSpec):
        try:
            check_source_allowed(spec.source, str(settings.artifacts), settings.eval_roots)
            local = local_checkpoint_file(spec.source)
            if local is not None:
                check_checkpoint_file(local)
        except SourceRefused as err:
            raise SpecError(str(err), "source") from None


def submit_spec(app: App, spec: dict[str, Any], idempotency_key: str | None, follow: bool,
                as_json: bool, checked: bool = False) -> None:
    parsed = parse_spec(spec)  # SpecError -> exit 2 before touching Redis
    if not checked:
        check_submittable(parsed, app.settings)
    record = app.queue.submit(parsed, idempotency_key=idempotency_key)
    if as_json and not follow:
        emit_json(record.to_dict())
        return
    if not as_json:
        echo(record.id)
    if follow:
        wait_and_report(app, record, as_json)



# ----------------------------------------------------------------------------- submit / eval / tune


@command()
@click.argument("model", type=click.Choice(MODEL_NAMES), metavar="MODEL")
@click.option("--gpus", type=float,
              help="GPUs, one data-parallel rank each; a fraction such as 0.5 shares one GPU with other jobs "
                   "(excludes --cpu-ranks).")
@click.option("--cpu-ranks", type=int,
              help=f"CPU data-parallel ranks, one process each (excludes --gpus; {default_of(TrainSpec, 'workers')}).")
@click.option("--workers", type=int, hidden=True, callback=deprecated_alias("--cpu-ranks"),
              help="Deprecated alias of --cpu-ranks.")
@click.option("--epochs", type=int, help=f"Training epochs ({default_of(TrainSpec, 'epochs')}).")
@click.option("--batch-size", type=int, help=f"Global batch size ({default_of(TrainSpec, 'batch_size')}).")
@click.option("--lr", type=float, help=f"Learning rate ({default_of(TrainSpec, 'lr')}).")
@click.option("--lr-decay", type=float, help=f"Per-epoch learning-rate factor ({default_of(TrainSpec, 'lr_decay')}).")
@click.option("--augment", metavar="PRESET",
              help=f"Training augmentation, e.g. shift2+rot15 ({default_of(TrainSpec, 'augment')}).")
@click.option("--eval-angles", type=NumberList(float),
              help=f"Test rotations in degrees ({default_of(TrainSpec, 'eval_angles')}).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2", help=SUITES_HELP)
@click.option("--seed", type=int, help=f"Random seed ({default_of(TrainSpec, 'seed')}).")
@training_job_options("Model config override (repeatable), e.g. routing_iters=2; values are JSON when they parse.")
@pass_app
def submit(app: App, model: str, gpus: float | None, cpu_ranks: int | None, workers: int | None, epochs: int | None,
           batch_size: int | None, lr: float | None, lr_decay: float | None, augment: str | None,
           eval_angles: list[float] | None, eval_suites: list[str] | None, dataset: str | None, seed: int | None,
           train_subset: int | None, val_split: int | None, test_subset: int | None, model_config: tuple[str, ...],
           priority: str | None, name: str | None, max_retries: int | None, max_lost: int | None, idempotency_key: str | None,
           follow: bool, as_json: bool) -> None:
    """Submit a training job for MODEL (capsctl models lists them); prints its id."""
    if workers is not None:  # the old spelling of --cpu-ranks, kept for one release
        if cpu_ranks is not None:
            raise click.UsageError("--workers is the deprecated spelling of --cpu-ranks: give only --cpu-ranks")
        cpu_ranks = workers
    if gpus is not None and cpu_ranks is not None:
        raise click.UsageError("--gpus and --cpu-ranks are mutually exclusive: a GPU job has one rank per GPU")
    spec = given({"kind": "train", "model": model}, gpus=gpus, workers=cpu_ranks, epochs=epochs,
                 batch_size=batch_size, lr=lr, lr_decay=lr_decay, augment=augment, eval_angles=eval_angles,
                 eval_suites=eval_suites, dataset=dataset, seed=seed, train_subset=train_subset,
                 val_split=val_split, test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_spec(app, spec, idempotency_key, follow, as_json)


@command("eval")
@click.argument("source", metavar="JOB_ID|CHECKPOINT")
@click.option("--angles", type=NumberList(float), help=f"Test rotations in degrees ({default_of(EvalSpec, 'angles')}).")
@click.option("--gpus", type=float,
              help=f"0, 1 or a fraction such as 0.25: evaluate on (a share of) a GPU the scheduler reserves "
                   f"for it ({default_of(EvalSpec, 'gpus')}).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2", help=SUITES_HELP)
@data_options(train=False)
@common_job_options
@pass_app
def eval_cmd(app: App, source: str, angles: list[float] | None, gpus: float | None,
             eval_suites: list[str] | None, dataset: str | None,
             test_subset: int | None, priority: str | None, name: str | None, max_retries: int | None,
             max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool) -> None:
    """Evaluate a trained job's checkpoint (or a checkpoint path within the artifact storage or
    CAPSNET_EVAL_ROOTS) on rotated test sets."""
    spec = given({"kind": "eval", "source": source}, angles=angles, gpus=gpus, eval_suites=eval_suites,
                 dataset=dataset, test_subset=test_subset, priority=priority, name=name, max_retries=max_retries,
                 max_lost=max_lost)
    check_submittable(parse_spec(spec), app.settings)  # the spec's and the operator's rules, before Redis
    check_eval_source(app, source.strip())
    submit_spec(app, spec, idempotency_key, follow, as_json, checked=True)


def check_eval_source(app: App, source: str) -> None:
    """Refuse an eval that can only fail at run time: the job must exist in Redis, a local path
    on disk. Remote URIs (``s3://`` ...) are left to the worker, which may see other storage."""
    if app.queue.get(source) is not None:
        return
    if JOB_ID_RE.match(source):
        raise SpecUsageError(f"source: no job {source} in Redis (see `capsctl list`)")
    scheme, sep, rest = source.partition("://")
    if sep and scheme != "file":
        return
    path = Path(rest if sep else source).expanduser()
    if not path.exists():
        raise SpecUsageError(f"source: {source} is neither a job id nor an existing checkpoint path")


@command()
@click.option("--models", type=WordList(),
              help=f"Models to compare ({default_of(TuneSpec, 'models')}; capsctl models lists them all).")
@click.option("--angles", type=NumberList(float),
              help=f"Training rotations, one condition each ({default_of(TuneSpec, 'angles')}).")
@click.option("--eval-angles", type=NumberList(float), help="Test rotations (default: --angles).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2", help=SUITES_HELP)
@click.option("--augment", type=WordList(), metavar="P1,P2",
              help="One augmentation preset per training angle (default shift2+rot<angle>).")
@click.option("--lr", type=NumberList(float), help="Learning rates to search, e.g. 1e-3,3e-4.")
@click.option("--routing-iters", type=NumberList(int), help="CapsNet routing iterations to search, e.g. 1,3.")
@click.option("--samples", type=int, help=f"Samples per grid point ({default_of(TuneSpec, 'samples')}).")
@click.option("--seeds", type=int, help=f"Seeds per condition, for mean ± std ({default_of(TuneSpec, 'seeds')}).")
@click.option("--seed", type=int, help=f"Base random seed ({default_of(TuneSpec, 'seed')}).")
@click.option("--epochs", type=int, help=f"Epochs per trial ({default_of(TuneSpec, 'epochs')}).")
@click.option("--batch-size", type=int, help=f"Batch size per trial ({default_of(TuneSpec, 'batch_size')}).")
@click.option("--gpus-per-trial", type=float,
              help=f"GPUs per trial: 1..8, or a fraction (0.5, 0.25, 0.125) to pack several trials on one GPU "
                   f"({default_of(TuneSpec, 'gpus_per_trial')}).")
@click.option("--max-concurrent", type=int, help=f"Trials at once ({default_of(TuneSpec, 'max_concurrent')}).")
@click.option("--asha/--no-asha", default=None, help=f"Early-stop weak trials with ASHA ({default_of(TuneSpec, 'asha')}).")
@training_job_options("Model config override (repeatable; capsnet.KEY=VALUE for one model).")
@pass_app
def tune(app: App, models: list[str] | None, angles: list[float] | None, eval_angles: list[float] | None,
         eval_suites: list[str] | None,
         augment: list[str] | None, lr: list[float] | None, routing_iters: list[int] | None,
         samples: int | None, seeds: int | None, seed: int | None, epochs: int | None,
         batch_size: int | None, gpus_per_trial: float | None, max_concurrent: int | None,
         asha: bool | None, dataset: str | None, train_subset: int | None, val_split: int | None,
         test_subset: int | None, model_config: tuple[str, ...], priority: str | None, name: str | None, max_retries: int | None,
         max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool) -> None:
    """Submit a robustness study: models × training rotations (× lr × routing × seeds) on Ray Tune."""
    spec = given({"kind": "tune"}, models=models, angles=angles, eval_angles=eval_angles, eval_suites=eval_suites,
                 augment=augment, lr=lr, routing_iters=routing_iters, samples=samples, seeds=seeds, seed=seed,
                 epochs=epochs, batch_size=batch_size, gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                 asha=asha, dataset=dataset, train_subset=train_subset, val_split=val_split,
                 test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_spec(app, spec, idempotency_key, follow, as_json)


@command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json: bool) -> None:
    """The models submit, eval and tune accept: parameters (full size) and what each is."""
    # The size check's formulas (the meta device where a model has none): no full-size model is built.
    from capsnet_core.models import estimate_model_size

    rows = [{"name": name, "parameters": estimate_model_size(name)[0],
             "description": MODEL_DESCRIPTIONS[name]} for name in MODEL_NAMES]
    if as_json:
        emit_json(rows)
        return
    click.echo(table(("model", "parameters", "description"),
                     [(r["name"], f"{r['parameters']:,}", r["description"]) for r in rows], right=(1,)))


# ----------------------------------------------------------------------------- results / compare


@command()
@click.argument("job_id")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also write accuracy vs angle (tune: a heatmap per model) as a PNG.")
@click.option("--confusion-angle", metavar="DEGREES", default=None,
              help="With --plot: also draw the confusion matrix at this test angle (OUT-confusion-DEG.png).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_app
def results(app: App, job_id: str, plot: Path | None, confusion_angle: str | None, as_json: bool) -> None:
    """Accuracy per test angle, per class, the training curve and the checkpoint of a finished job."""
    record = app.job(job_id)
    if record.result is None:
        raise UserError(f"job {job_id} has no results yet (state {record.state})"
                        + (f": {record.error}" if record.error else ""))
    if confusion_angle is not None and plot is None:
        raise click.UsageError("--confusion-angle needs --plot OUT.png (the figure is written beside it)")
    written = write_plots(record, plot, confusion_angle) if plot else []
    if as_json:
        result = record.result if isinstance(record.result, dict) else {}
        emit_json({"id": record.id, "kind": record.kind, "model": record.model, "state": record.state,
                    "result": record.result, "checkpoint": result.get("checkpoint") or record.checkpoint,
                    "plots": [str(p) for p in written]})
        return
    print_results(record)
    for p in written:
        echo(f"Plot: {p}")


@command()
@click.argument("job_ids", metavar="JOB [JOB ...]", nargs=-1, required=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also draw every run's accuracy against test angle on one plot (± std bands for seeds).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (accuracies as fractions).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: one row per run, acc_<angle> and std_<angle> columns.")
@click.option("--class", "class_index", type=click.IntRange(0, 999), default=None, metavar="N",
              help="Compare the accuracy on the test images of class N only (train and eval jobs).")
@pass_app
def compare(app: App, job_ids: tuple[str, ...], plot: Path | None, as_json: bool, as_csv: bool,
            class_index: int | None) -> None:
    """Finished train, eval and tune jobs side by side: accuracy per test angle (tune: one row per
    model × augmentation, mean ± std over seeds), parameters, epochs; angles are the union of the jobs'."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv are mutually exclusive")
    records = [app.job(job_id) for job_id in dict.fromkeys(job_ids)]
    try:
        comparison = compare_mod.compare(records, app.queue.get, class_index)
        written = compare_mod.plot(comparison, plot) if plot else None
    except compare_mod.CompareError as err:
        raise UserError(str(err)) from None
    if as_json:
        emit_json({**comparison.to_dict(), "plot": str(written) if written else None})
        return
    if as_csv:
        echo(compare_mod.to_csv(comparison), nl=False)
        return
    headers, rows, right = compare_mod.table_rows(comparison)
    echo(table(headers, rows, right=right))
    echo(f"\n{compare_mod.ACCURACY_NOTE if class_index is None else compare_mod.class_note(class_index)}")
    if written:
        echo(f"Plot: {written}")


