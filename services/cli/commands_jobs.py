"""The commands that submit jobs (submit, eval, tune) and read their outcome (results, compare),
plus ``models``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from capsnet_core.models.configs import MODEL_DESCRIPTIONS, MODEL_NAMES
from services.cli.dry_run import print_plans
from services.cli.follow import wait_and_report
from services.cli.helpers import App, SpecUsageError, UserError, command, echo, emit_json, pass_app
from services.cli.jobfiles import JobDocument, job_documents
from services.cli.options import (
    NumberList,
    WordList,
    common_job_options,
    data_options,
    default_of,
    given,
    job_file_options,
    kept_spec_fields,
    parse_model_config,
    parse_tags,
    range_of,
    training_job_options,
)
from services.cli.render import print_results, table, write_plots
from services.config import Settings
from services.queue.errors import JobNotFound
from services.queue.submission import check_eval_source
from services.results import compare as compare_mod
from services.results.job_results import NoResults, job_result
from services.spec.errors import SpecError
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec, job_spec_schema, parse_spec
from services.spec.submittable import check_submittable

SUITES_HELP = "Test suites: rotation (0-180° in 15° steps + AUC), affine (affine-MNIST or affNIST)."


def with_tracking(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``spec`` with the kept-aside options in it (--time-limit, --mlflow / --mlflow-experiment, or
    CAPSNET_MLFLOW_URI); refuses a tracking URI when mlflow is not installed, before anything is queued."""
    from services.runs.tracking import INSTALL_HINT, mlflow_installed

    spec = {**spec, **kept_spec_fields()}
    if "mlflow_uri" not in spec and settings.mlflow_uri:
        spec["mlflow_uri"] = settings.mlflow_uri
    if spec.get("mlflow_uri") and not mlflow_installed():
        raise SpecUsageError(f"mlflow_uri: MLflow tracking needs the mlflow package: {INSTALL_HINT}")
    return spec


def validated(app: App, job: JobDocument) -> Any:
    """One job's spec, checked by the spec's and the operator's rules (and for eval, that its
    source exists), before anything touches the queue; errors name the file and document."""
    try:
        parsed = parse_spec(with_tracking(job.spec, app.settings))
        check_submittable(parsed, app.settings)
        if isinstance(parsed, EvalSpec):
            check_eval_source(app.queue, parsed.source.strip())
    except (SpecError, SpecUsageError) as err:
        raise job.error(str(err) if isinstance(err, SpecError) else err.message) from None
    return parsed


def submit_jobs(app: App, kind: str, flags: dict[str, Any], job_file: Path | None, dry_run: bool,
                idempotency_key: str | None, follow: bool, as_json: bool) -> None:
    """Validate every job (of the file, or of the flags alone), then submit them all, or with
    ``dry_run`` print what would be submitted. Nothing is enqueued unless every job is valid."""
    jobs = job_documents(kind, flags, job_file)
    if follow and len(jobs) > 1:
        raise click.UsageError(f"--follow follows one job; {job_file} holds {len(jobs)} (follow each with "
                               f"`capsctl logs -f JOB`)")
    specs = [validated(app, job) for job in jobs]
    if dry_run:
        print_plans(specs, as_json)
        return
    records = []
    for index, spec in enumerate(specs):
        # One key per document: submitting the same file again with the same key is a no-op.
        key = f"{idempotency_key}#{index}" if idempotency_key and len(specs) > 1 else idempotency_key
        records.append(app.queue.submit(spec, idempotency_key=key))
    if as_json and not follow:
        emit_json(records[0].to_dict() if len(records) == 1 else [r.to_dict() for r in records])
        return
    if not as_json:
        for record in records:
            echo(record.id)
    if follow:
        wait_and_report(app, records[0], as_json)

# ----------------------------------------------------------------------------- submit / eval / tune


@command()
@click.argument("model", type=click.Choice(MODEL_NAMES), metavar="MODEL", required=False)
@click.option("--gpus", type=float,
              help="GPUs, one data-parallel rank each; a fraction such as 0.5 shares one GPU with other jobs "
                   f"(excludes --cpu-ranks; {default_of(TrainSpec, 'gpus')}).")
@click.option("--cpu-ranks", type=int,
              help=f"CPU data-parallel ranks, one process each (excludes --gpus; {default_of(TrainSpec, 'cpu_ranks')}).")
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
@job_file_options
@pass_app
def submit(app: App, model: str, gpus: float | None, cpu_ranks: int | None, epochs: int | None,
           batch_size: int | None, lr: float | None, lr_decay: float | None, augment: str | None,
           eval_angles: list[float] | None, eval_suites: list[str] | None, dataset: str | None, seed: int | None,
           train_subset: int | None, val_split: int | None, test_subset: int | None, model_config: tuple[str, ...],
           priority: str | None, name: str | None, tags: tuple[str, ...], max_retries: int | None, max_lost: int | None, idempotency_key: str | None,
           follow: bool, as_json: bool, job_file: Path | None, dry_run: bool) -> None:
    """Submit a training job for MODEL (capsctl models lists them), or the jobs of a job file
    (-f job.yaml; flags typed beside it override it); prints their ids."""
    if model is None and job_file is None:
        raise click.UsageError("Missing argument 'MODEL' (or give a job file with -f FILE)")
    if gpus is not None and cpu_ranks is not None:
        raise click.UsageError("--gpus and --cpu-ranks are mutually exclusive: a GPU job has one rank per GPU")
    spec = given({}, model=model, gpus=gpus, cpu_ranks=cpu_ranks, epochs=epochs,
                 batch_size=batch_size, lr=lr, lr_decay=lr_decay, augment=augment, eval_angles=eval_angles,
                 eval_suites=eval_suites, dataset=dataset, seed=seed, train_subset=train_subset,
                 val_split=val_split, test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if tags:
        spec["tags"] = parse_tags(tags)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_jobs(app, "train", spec, job_file, dry_run, idempotency_key, follow, as_json)


@command("eval")
@click.argument("source", metavar="JOB_ID|CHECKPOINT", required=False)
@click.option("--angles", type=NumberList(float), help=f"Test rotations in degrees ({default_of(EvalSpec, 'angles')}).")
@click.option("--gpus", type=float,
              help=f"Evaluate on (a share of) a GPU the scheduler reserves for it: 0..1, e.g. 1 or 0.25 "
                   f"({default_of(EvalSpec, 'gpus')}).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2", help=SUITES_HELP)
@data_options(train=False)
@common_job_options
@job_file_options
@pass_app
def eval_cmd(app: App, source: str, angles: list[float] | None, gpus: float | None,
             eval_suites: list[str] | None, dataset: str | None,
             test_subset: int | None, priority: str | None, name: str | None, tags: tuple[str, ...],
             max_retries: int | None,
             max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool,
             job_file: Path | None, dry_run: bool) -> None:
    """Evaluate a trained job's checkpoint (or a checkpoint path within the artifact storage or
    CAPSNET_EVAL_ROOTS) on rotated test sets; -f FILE reads the evaluation from a job file."""
    if source is None and job_file is None:
        raise click.UsageError("Missing argument 'JOB_ID|CHECKPOINT' (or give a job file with -f FILE)")
    source = job_prefix_source(app, source.strip()) if source is not None else None
    spec = given({}, source=source, angles=angles, gpus=gpus, eval_suites=eval_suites,
                 dataset=dataset, test_subset=test_subset, priority=priority, name=name, max_retries=max_retries,
                 max_lost=max_lost)
    if tags:
        spec["tags"] = parse_tags(tags)
    submit_jobs(app, "eval", spec, job_file, dry_run, idempotency_key, follow, as_json)


def job_prefix_source(app: App, source: str) -> str:
    """An eval source that is a unique prefix of a job id, as that full id; anything else (a
    path, a URI, an unknown id) unchanged for check_eval_source to judge."""
    if not source.startswith("j-") or Path(source).expanduser().exists():
        return source
    try:
        return app.queue.resolve(source)
    except JobNotFound:
        return source


@command()
@click.option("--models", type=WordList(),
              help=f"Models to compare ({default_of(TuneSpec, 'models')}; capsctl models lists them all).")
@click.option("--angles", type=NumberList(float),
              help=f"Training rotations, one condition each ({default_of(TuneSpec, 'angles')}).")
@click.option("--eval-angles", type=NumberList(float),
              help=f"Test rotations ({range_of(TuneSpec, 'eval_angles')}; default: --angles).")
@click.option("--eval-suite", "eval_suites", type=WordList(), metavar="S1,S2", help=SUITES_HELP)
@click.option("--augment", type=WordList(), metavar="P1,P2",
              help="One augmentation preset per training angle (default shift2+rot<angle>).")
@click.option("--lr", type=NumberList(float),
              help=f"Learning rates to search, e.g. 1e-3,3e-4 (up to 16, {range_of(TuneSpec, 'lr')}).")
@click.option("--routing-iters", type=NumberList(int),
              help=f"CapsNet routing iterations to search, e.g. 1,3 (up to 16, "
                   f"{range_of(TuneSpec, 'routing_iters')}).")
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
@job_file_options
@pass_app
def tune(app: App, models: list[str] | None, angles: list[float] | None, eval_angles: list[float] | None,
         eval_suites: list[str] | None,
         augment: list[str] | None, lr: list[float] | None, routing_iters: list[int] | None,
         samples: int | None, seeds: int | None, seed: int | None, epochs: int | None,
         batch_size: int | None, gpus_per_trial: float | None, max_concurrent: int | None,
         asha: bool | None, dataset: str | None, train_subset: int | None, val_split: int | None,
         test_subset: int | None, model_config: tuple[str, ...], priority: str | None, name: str | None, tags: tuple[str, ...], max_retries: int | None,
         max_lost: int | None, idempotency_key: str | None, follow: bool, as_json: bool,
         job_file: Path | None, dry_run: bool) -> None:
    """Submit a robustness study: models × training rotations (× lr × routing × seeds) on Ray Tune;
    -f sweep.yaml reads it from a job file."""
    spec = given({}, models=models, angles=angles, eval_angles=eval_angles, eval_suites=eval_suites,
                 augment=augment, lr=lr, routing_iters=routing_iters, samples=samples, seeds=seeds, seed=seed,
                 epochs=epochs, batch_size=batch_size, gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                 asha=asha, dataset=dataset, train_subset=train_subset, val_split=val_split,
                 test_subset=test_subset, priority=priority, name=name, max_retries=max_retries, max_lost=max_lost)
    if tags:
        spec["tags"] = parse_tags(tags)
    if model_config:
        spec["model_config"] = parse_model_config(model_config)
    submit_jobs(app, "tune", spec, job_file, dry_run, idempotency_key, follow, as_json)


@command("schema")
@click.argument("kind", type=click.Choice(["train", "eval", "tune"]), required=False)
def schema_cmd(kind: str | None) -> None:
    """The JSON Schema of a job spec (KIND train, eval or tune; all three when left out), for
    editors that complete and check job files."""
    emit_json(job_spec_schema(kind))


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
    try:
        result = job_result(record)
    except NoResults as err:
        raise UserError(str(err)) from None
    if confusion_angle is not None and plot is None:
        raise click.UsageError("--confusion-angle needs --plot OUT.png (the figure is written beside it)")
    written = write_plots(record, plot, confusion_angle) if plot else []
    if as_json:
        emit_json({"id": record.id, "kind": record.kind, "model": record.model, "state": record.state,
                   "result": result.to_document(), "checkpoint": result.checkpoint or record.checkpoint,
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
    # two prefixes (or a prefix and the full id) of one job compare it once
    records = list({r.id: r for r in (app.job(job_id) for job_id in job_ids)}.values())
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


