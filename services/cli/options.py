"""Option types and option groups the job commands share. Defaults shown in the help are read
from the job specs (services.spec.jobspec), which apply them: the options themselves default to
None, so that only what the user gave goes into a spec."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

from capsnet_core.models.configs import MODEL_NAMES
from services.queue.selection import JobFilter
from services.queue.states import JobState
from services.spec.errors import allowed_values
from services.spec.jobspec import TrainSpec
from services.spec.types import DATASETS, KINDS, PRIORITIES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def shown(value: Any) -> str:
    """A default as the help shows it: ``10``, ``0.001``, ``0,15,35``, ``on``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(shown(v) for v in value)
    return str(value)


def range_of(spec: type[BaseModel], field: str) -> str | None:
    """The numbers a job spec field allows as the help shows them: ``1..1000``, ``(0, 1]``,
    ``1..32 numbers in [-180, 180]``; None for a field that is not numeric."""
    hint = allowed_values(spec, field)
    if hint is None:
        return None
    hint = hint.removesuffix(" or null")
    for prefix in ("an integer in ", "a number in "):
        if hint.startswith(prefix):
            return hint.removeprefix(prefix)
    items = hint.removeprefix("a list of ")
    if items.startswith(("numbers in ", "integers in ")):
        return "each in " + items.partition(" in ")[2]
    if items != hint and items[:1].isdigit():  # "1..32 numbers in [-180, 180]"
        return items
    return hint if hint == "0 or 1" else None


def default_of(spec: type[BaseModel], field: str) -> str:
    """``<range>; default <value>`` of a job spec field (the range where it is numeric), for an
    option's help text: the user sees what is allowed before trying."""
    default = f"default {shown(spec.model_fields[field].get_default(call_default_factory=True))}"
    allowed = range_of(spec, field)
    return f"{allowed}; {default}" if allowed else default


class NumberList(click.ParamType):
    """Comma-separated numbers, e.g. ``0,15,35`` (``float``) or ``1,3`` (``int``)."""

    def __init__(self, kind: type = float) -> None:
        self.kind = kind
        self.name = "INTS" if kind is int else "NUMBERS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not items or any(v == "" for v in items):
            self.fail(f"{value!r}: expected comma-separated {'integers' if self.kind is int else 'numbers'} "
                      f"such as {'1,3' if self.kind is int else '0,15,35'}", param, ctx)
        try:
            return [self.kind(v) for v in items]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated {'integers' if self.kind is int else 'numbers'} "
                      f"such as {'1,3' if self.kind is int else '0,15,35'}", param, ctx)


class WordList(click.ParamType):
    name = "A,B"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if any(v == "" for v in items):
            self.fail(f"{value!r}: expected a comma-separated list without empty items", param, ctx)
        return items


def parse_model_config(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs -> dict; values parsed as JSON when possible; ``model.key=value``
    nests (per-model overrides)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value, e.g. conv_channels=64",
                                     param_hint="'--model-config'")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if "." in key:
            model, _, sub = key.partition(".")
            nested = out.setdefault(model, {})
            if not isinstance(nested, dict):
                raise click.BadParameter(f"{pair!r}: {model} is set both as a value and per model",
                                         param_hint="'--model-config'")
            nested[sub] = value
        else:
            out[key] = value
    return out


def parse_tags(pairs: Sequence[str], option: str = "--tag") -> dict[str, str]:
    """``key=value`` pairs -> ``{key: value}`` (the spec validates their characters and count)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value, e.g. sweep=a", param_hint=f"'{option}'")
        if key in out and out[key] != value:
            raise click.BadParameter(f"{pair!r}: tag {key} is given twice", param_hint=f"'{option}'")
        out[key] = value
    return out


def given(spec: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``spec`` with the options the user gave (not None, not an empty multiple option) set."""
    for key, value in values.items():
        if value is not None and value != ():
            spec[key] = value
    return spec


def data_options(train: bool) -> Decorator:
    """--dataset, [--train-subset, --val-split,] --test-subset: shared by submit, eval and tune."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--test-subset", type=int,
                         help=f"Test on the first N images only ({range_of(TrainSpec, 'test_subset')}).")(f)
        if train:
            f = click.option("--val-split", type=int,
                             help=f"Hold out N training images (class-stratified, fixed seed) to measure every "
                                  f"epoch and make every selection on ({default_of(TrainSpec, 'val_split')}); "
                                  "carved before --train-subset; 0 = none.")(f)
            f = click.option("--train-subset", type=int,
                             help=f"Train on the first N images left after the validation split "
                                  f"({range_of(TrainSpec, 'train_subset')}).")(f)
        return click.option("--dataset", type=click.Choice(DATASETS),
                            help=f"Dataset ({default_of(TrainSpec, 'dataset')}).")(f)
    return decorate


def common_job_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every submitting command shares (the fields of every job spec)."""
    options = [
        click.option("--priority", type=click.Choice(PRIORITIES),
                     help=f"Queue priority ({default_of(TrainSpec, 'priority')})."),
        click.option("--name", help="A label for the job (shown by list/status)."),
        click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
                     help="A tag to find the job by (repeatable, at most 20), e.g. sweep=a; "
                          "`capsctl list --tag sweep=a`."),
        click.option("--max-retries", type=int,
                     help=f"Automatic retries after a failure ({default_of(TrainSpec, 'max_retries')})."),
        click.option("--max-lost", type=int,
                     help=f"Times the job may lose its worker (lease expired) and resume "
                          f"({default_of(TrainSpec, 'max_lost')}); never uses up --max-retries."),
        click.option("--idempotency-key", help="Submitting again with the same key returns the same job."),
        click.option("--follow", is_flag=True, help="Show progress until the job ends; exit 1 if it fails."),
        click.option("--json", "as_json", is_flag=True, help="Print the job record as JSON."),
        click.option("--time-limit", "time_limit_s", type=Duration(unit="s"), metavar="DURATION",
                     expose_value=False, callback=_keep_spec_field,
                     help="Stop each attempt past this wall time and fail the job (no retry), like sbatch "
                          "--time: 90s, 30m, 2h or 1d, 1..30d (default: none)."),
        click.option("--mlflow", "mlflow_uri", metavar="URI", expose_value=False, callback=_keep_spec_field,
                     help="Log the job to this MLflow tracking server (default: CAPSNET_MLFLOW_URI; "
                          "needs capsctl[mlflow])."),
        click.option("--mlflow-experiment", metavar="NAME", expose_value=False, callback=_keep_spec_field,
                     help="MLflow experiment to log the job under (default capsctl)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


KEPT_FIELDS_META = "capsctl.spec_fields"


def _keep_spec_field(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep --time-limit / --mlflow / --mlflow-experiment aside in the context (``kept_spec_fields``),
    so that every submitting command passes them on without naming them in its signature."""
    if value is not None:
        ctx.meta.setdefault(KEPT_FIELDS_META, {})[param.name] = (
            int(round(value)) if param.name == "time_limit_s" else value)
    return value


def kept_spec_fields() -> dict[str, Any]:
    """The spec fields those options gave (``time_limit_s``, ``mlflow_uri``, ``mlflow_experiment``)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(KEPT_FIELDS_META, {})) if ctx is not None else {}


def job_file_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """-f/--file and --dry-run: shared by submit, eval and tune (services.cli.jobfiles)."""
    f = click.option("--dry-run", is_flag=True,
                     help="Validate and print the spec, the resources it claims and (tune) its trial count "
                          "as YAML (with --json: JSON); enqueue nothing.")(f)
    return click.option("--file", "-f", "job_file", metavar="FILE",
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="A job file (YAML, several --- documents for several jobs, or JSON) with the spec "
                             "fields (`capsctl schema`); flags typed beside it override it.")(f)


class Duration(click.ParamType):
    """An age such as ``7d``, ``12h``, ``30m`` or ``90s`` (a bare number is days), in seconds."""

    name = "AGE"
    UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}

    def __init__(self, unit: str = "d") -> None:
        self.bare_unit = self.UNITS[unit]  # what a bare number means

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:]) if text else None
        try:
            amount = float(text[:-1] if unit else text)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or amount < 0:
            what = "an age" if self.bare_unit == self.UNITS["d"] else "a duration"
            self.fail(f"{value!r}: expected {what} such as 7d, 12h, 30m or 90s", param, ctx)
        return amount * (unit or self.bare_unit)


def training_job_options(model_config_help: str) -> Decorator:
    """What submit and tune share after their own options: the data options, --model-config and
    ``common_job_options``."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = common_job_options(f)
        f = click.option("--model-config", multiple=True, metavar="KEY=VALUE", help=model_config_help)(f)
        return data_options(train=True)(f)
    return decorate



def job_filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--tag, --name, --model, --kind, --state, --since: what ``list``, ``cancel`` and ``retry``
    select jobs by (see ``job_filter``)."""
    options = [
        click.option("--tag", "tag_filters", multiple=True, metavar="KEY=VALUE",
                     help="Only jobs with this tag (repeatable: all must match)."),
        click.option("--name", "name_glob", metavar="GLOB", help="Only jobs whose name matches, e.g. 'sweep-*'."),
        click.option("--model", "model_filter", type=click.Choice(MODEL_NAMES), help="Only jobs of this model."),
        click.option("--kind", "kind_filter", type=click.Choice(KINDS), help="Only jobs of this kind."),
        click.option("--state", type=click.Choice(tuple(s.value for s in JobState)), help="Only jobs in this state."),
        click.option("--since", type=Duration(), metavar="AGE",
                     help="Only jobs submitted within this age, e.g. 30m, 2h, 1d."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def job_filter(tag_filters: Sequence[str], name_glob: str | None, model_filter: str | None, kind_filter: str | None,
               state: str | None, since: float | None) -> JobFilter:
    """The options of ``job_filter_options`` as a queue-side filter. ``--since`` is measured on
    this machine's clock against the Redis server's submit times: the same clock where capsctl
    runs beside Redis, seconds apart elsewhere, which an age in minutes or hours tolerates."""
    return JobFilter(tags=parse_tags(tag_filters), name=name_glob, model=model_filter, kind=kind_filter,
                     state=state, since=None if since is None else time.time() - since)
