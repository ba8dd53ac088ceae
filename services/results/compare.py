"""``capsctl compare``: finished train, eval and tune jobs side by side.

One row per run: a train job, an eval job, or one model × training augmentation of a tune job
(mean ± std over its seeds, of the hyperparameters the study selected for that row). Columns:
the job, its name, the model, its training augmentation, parameters, epochs, seeds, then the
accuracy at every test angle of any of the jobs (the union, in degrees order; a run without a
figure at an angle has a blank there). The table, JSON, CSV and the overlay plot are all built
from the same ``Comparison``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from services.queue.job import JobRecord
from services.queue.parsing import finite
from services.results.plot_labels import budget_text
from services.spec.errors import SpecError
from services.spec.jobspec import TrainSpec, TuneSpec, parse_spec
from services.spec.results import JobResult

ACCURACY_NOTE = "accuracy (%) on the test set rotated by each angle; tune rows: mean ± std over seeds"


def class_note(class_index: int) -> str:
    return f"accuracy (%) on the test images of class {class_index} only, rotated by each angle"


class CompareError(ValueError):
    """A job that cannot be compared (no results yet, nothing measured by angle)."""


@dataclass
class Run:
    """One row of the comparison. Accuracies are fractions (0..1) keyed by angle ("0", "15", ...)."""

    job: str
    kind: str
    name: str | None
    model: str | None
    augment: str | None
    parameters: int | None
    epochs: int | None
    seeds: int
    accuracy: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    rotation_auc: float | None = None
    budget: str = ""  # "3 epochs × 12,000 images, shift2": what the model trained on

    @property
    def label(self) -> str:
        """The run in a legend: ``lenet5, tune tune-a, 3 epochs × 12,000 images, shift2+rot15, mean ± std
        of 3 seeds, AUC 51.5 %`` (the budget says whether two curves are comparable at all)."""
        what = self.budget or " ".join(p for p in (self.augment,) if p)
        seeds = f", mean ± std of {self.seeds} seeds" if self.seeds > 1 else ""
        auc = f", AUC {100 * self.rotation_auc:.1f} %" if self.rotation_auc is not None else ""
        return f"{self.model or '?'}, {self.kind} {self.name or self.job}" + (f", {what}" if what else "") + seeds + auc


@dataclass
class Comparison:
    angles: list[str]
    runs: list[Run]

    def to_dict(self) -> dict[str, Any]:
        return {"angles": self.angles,
                "runs": [{**asdict(r), "accuracy": {a: r.accuracy.get(a) for a in self.angles},
                          "std": {a: r.std.get(a) for a in self.angles}} for r in self.runs]}


# ----------------------------------------------------------------------------- building it


def _angle_key(angle: Any) -> str:
    """The key a result uses for an angle: ``15`` for 15.0, ``7.5`` for 7.5."""
    v = finite(angle)
    return f"{v:g}" if v is not None else str(angle)


def _angle_order(key: str) -> tuple[int, float, str]:
    v = finite(key)
    return (0, v, "") if v is not None else (1, 0.0, key)


@cache
def _count_parameters(model: str, frozen_kwargs: tuple[tuple[str, Any], ...]) -> int | None:
    from capsnet_core import build_model

    try:
        net = build_model(model, **{k: _thaw(v) for k, v in frozen_kwargs})
    except Exception:  # a spec from another version of the models: no count rather than no table
        return None
    return sum(p.numel() for p in net.parameters())


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ("__list__", tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    return value


def count_parameters(model: str | None, kwargs: Mapping[str, Any]) -> int | None:
    """Trainable parameters of ``model`` built with ``kwargs`` (the job's model config)."""
    if not model:
        return None
    return _count_parameters(model, tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))


def _spec(record: JobRecord) -> Any:
    try:
        return parse_spec(record.spec)
    except (SpecError, ValueError, TypeError):
        return None


def _class_accuracy(record: JobRecord, result: JobResult, class_index: int) -> dict[str, Any]:
    """One class's accuracy by angle, from the result's per-class lists."""
    per_class = result.per_class
    if not per_class:
        raise CompareError(f"job {record.id} has no per-class accuracy to compare")
    out = {a: v[class_index] for a, v in per_class.items() if isinstance(v, list) and class_index < len(v)}
    if not out:
        raise CompareError(f"job {record.id} has no class {class_index} (its results have "
                           f"{max((len(v) for v in per_class.values() if isinstance(v, list)), default=0)} classes)")
    return out


def _train_run(record: JobRecord, result: JobResult, kind: str,
               source: JobRecord | None = None, class_index: int | None = None) -> Run:
    rot = result.rotation_accuracy if class_index is None else _class_accuracy(record, result, class_index)
    if not rot:
        raise CompareError(f"job {record.id} has no accuracy by test angle to compare")
    trained = source if source is not None else record
    spec = _spec(trained)
    train_spec = spec if isinstance(spec, TrainSpec) else None
    model = (train_spec.model if train_spec else None) or result.model or record.model or None
    history = result.history
    trained_result = JobResult.read(source.result) if source is not None else None
    if trained_result is not None and trained_result.history is not None:
        history = trained_result.history
    epochs = len(history) if history else (train_spec.epochs if train_spec else None)
    return Run(job=record.id, kind=kind, name=record.name, model=model,
               augment=train_spec.augment if train_spec else None,
               parameters=count_parameters(model, train_spec.model_kwargs()) if train_spec else None,
               epochs=epochs, seeds=1,
               accuracy={_angle_key(a): finite(v) for a, v in rot.items()},
               std={_angle_key(a): None for a in rot},
               rotation_auc=finite((result.suite_accuracy or {}).get("rotation_auc")) if class_index is None else None,
               budget=budget_text(train_spec.to_dict()) if train_spec else "")


def _tune_runs(record: JobRecord, result: JobResult) -> list[Run]:
    models = result.models
    if not models:
        raise CompareError(f"job {record.id} has no robustness matrix to compare")
    spec = _spec(record)
    tune_spec = spec if isinstance(spec, TuneSpec) else None
    runs = []
    for model, m in models.items():
        if not isinstance(m, Mapping):
            continue
        cols = [_angle_key(c) for c in m.get("cols") or []]
        params = count_parameters(str(model), tune_spec.model_kwargs(str(model))) if tune_spec else None
        for i, augment in enumerate(m.get("rows") or []):
            mean, std, n = (_grid_row(m.get(k), i) for k in ("mean", "std", "n"))
            seeds = max((int(v) for v in n if isinstance(v, int | float)), default=0)
            runs.append(Run(job=record.id, kind="tune", name=record.name, model=str(model), augment=str(augment),
                            parameters=params, epochs=tune_spec.epochs if tune_spec else None,
                            seeds=seeds or (tune_spec.seeds if tune_spec else 1),
                            budget=budget_text({**tune_spec.to_dict(), "augment": str(augment)}) if tune_spec else "",
                            accuracy={c: finite(mean[j]) if j < len(mean) else None for j, c in enumerate(cols)},
                            std={c: finite(std[j]) if j < len(std) and seeds > 1 else None
                                 for j, c in enumerate(cols)}))
    return runs


def _grid_row(grid: Any, i: int) -> list[Any]:
    if isinstance(grid, list) and i < len(grid) and isinstance(grid[i], list):
        return grid[i]
    return []


def runs_of(record: JobRecord, lookup: Callable[[str], JobRecord | None],
            class_index: int | None = None) -> list[Run]:
    """The comparison rows of one finished job; ``lookup`` finds the job an eval job evaluated.
    With ``class_index``, the rows hold that class's accuracy instead of the overall one."""
    result = JobResult.read(record.result)
    if result is None:
        raise CompareError(f"job {record.id} has no results yet (state {record.state})")
    if record.kind == "tune" or result.kind == "tune":
        if class_index is not None:
            raise CompareError(f"job {record.id} is a tune job: its matrix holds no per-class figures; "
                               "compare --class takes train and eval jobs")
        return _tune_runs(record, result)
    if record.kind == "eval":
        spec = _spec(record)
        source_id = getattr(spec, "source_job", None)
        source = lookup(source_id) if source_id else None
        return [_train_run(record, result, "eval", source=source, class_index=class_index)]
    return [_train_run(record, result, record.kind or "train", class_index=class_index)]


def compare(records: Sequence[JobRecord], lookup: Callable[[str], JobRecord | None],
            class_index: int | None = None) -> Comparison:
    runs = [run for record in records for run in runs_of(record, lookup, class_index)]
    angles = sorted({a for r in runs for a, v in r.accuracy.items() if v is not None}, key=_angle_order)
    return Comparison(angles=angles, runs=runs)


# ----------------------------------------------------------------------------- rendering it


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def fmt_parameters(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]], list[int]]:
    """Headers, rows of text and the right-aligned columns, for the CLI's ``table``."""
    headers = ["JOB", "NAME", "KIND", "MODEL", "AUGMENT", "PARAMS", "EPOCHS", "SEEDS",
               *(f"{a}°" for a in comparison.angles)]
    rows = [[r.job, r.name or "-", r.kind, r.model or "-", r.augment or "-", fmt_parameters(r.parameters),
             "-" if r.epochs is None else str(r.epochs), str(r.seeds),
             *(_cell(r.accuracy.get(a), r.std.get(a)) for a in comparison.angles)] for r in comparison.runs]
    return headers, rows, [5, 6, 7, *range(8, 8 + len(comparison.angles))]


def to_csv(comparison: Comparison) -> str:
    """One row per run; accuracy and std as fractions (``acc_<angle>``, ``std_<angle>``), blank when absent."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", "name", "kind", "model", "augment", "parameters", "epochs", "seeds",
                     *(f"{p}_{a}" for a in comparison.angles for p in ("acc", "std"))])
    for r in comparison.runs:
        cells = []
        for a in comparison.angles:
            cells += [r.accuracy.get(a), r.std.get(a)]
        writer.writerow(["" if v is None else v for v in (r.job, r.name, r.kind, r.model, r.augment, r.parameters,
                                                          r.epochs, r.seeds, *cells)])
    return out.getvalue()


def plot(comparison: Comparison, path: Path) -> Path:
    """Every run's accuracy against test angle on one figure, ± std bands for runs with seeds."""
    from capsnet_core.plots import plot_accuracy_curves

    curves = {}
    for r in comparison.runs:
        label = r.label
        while label in curves:  # the same job given twice, or two rows that read alike
            label += "'"
        curves[label] = {a: (v, r.std.get(a)) for a, v in r.accuracy.items() if v is not None}
    if not any(curves.values()):
        raise CompareError("nothing to plot: none of the jobs has an accuracy by angle")
    return plot_accuracy_curves(curves, path, title="Accuracy on rotated test images")


__all__ = ["ACCURACY_NOTE", "CompareError", "class_note", "Comparison", "Run", "compare", "fmt_parameters", "plot", "runs_of",
           "table_rows", "to_csv"]
