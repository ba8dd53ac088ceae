"""How capsctl shows things: aligned tables, the ``fmt_*`` cells, one line per job event, and a
finished job's results (tables, and plots with ``--plot``). Pure functions of what Redis held:
any value, however malformed, renders as text rather than raising."""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.artifacts import is_uri
from services.cli.helpers import UserError, echo
from services.queue.job import JobRecord
from services.queue.parsing import finite, first, printable
from services.results.plot_labels import curve_label, plot_title
from services.spec.results import JobResult


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """Plain aligned columns (two spaces apart); columns in ``right`` are right-aligned."""
    rows = [["" if v is None else printable(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def fmt_time(ts: Any) -> str:
    """Local time of a timestamp; "-" when there is none, "invalid" when it is not a time."""
    if ts is None or ts == "" or ts == 0:
        return "-"
    value = finite(ts)
    try:
        return _dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "invalid"


def fmt_age(ts: Any, now: float | None = None) -> str:
    if ts is None or ts == "" or ts == 0:
        return "-"
    value = finite(ts)
    if value is None:
        return "invalid"
    secs = max(0.0, (now or time.time()) - value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit}"
    return f"{int(secs)}s"


def fmt_pct(value: Any, digits: int = 2) -> str:
    v = finite(value)
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def fmt_num(value: Any, fmt: str = ".4f") -> str:
    v = finite(value)
    return "-" if v is None else format(v, fmt)


def fmt_angle(angle: Any) -> str:
    v = finite(angle)
    return printable(angle) if v is None else f"{v:g}°"


def angle_sorted(keys: Iterable[Any]) -> list[Any]:
    def key(a: Any) -> tuple[int, float, str]:
        v = finite(a)
        return (1, 0.0, printable(a)) if v is None else (0, v, "")

    return sorted(keys, key=key)


def fmt_value(value: Any) -> str:
    """Any stored JSON value as one short cell: text as is, the rest as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:  # surrogates kept (ensure_ascii=False), so that echo shows undecodable bytes as \xNN
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def fmt_progress(record: JobRecord) -> str:
    """A short progress cell such as ``ep 3/10 87%``."""
    if record.state == "succeeded":
        return "done"
    p = record.progress or {}
    if not p:
        return "-"
    if p.get("type") == "eval" and record.kind == "train":
        return f"ep {p.get('epoch', '?')}/{p.get('epochs', '?')} eval"
    if p.get("epoch") is not None and p.get("epochs") is not None:
        text = f"ep {p['epoch']}/{p['epochs']}"
        step, steps = p.get("step"), p.get("steps_per_epoch")
        if p.get("type") == "epoch":
            text += " 100%"
        elif (fraction := ratio(step, steps)) is not None:
            text += f" {min(1.0, fraction):.0%}"
        return text
    if p.get("trials") is not None:
        return f"trials {p.get('trials_done', p.get('done', '?'))}/{p['trials']}"
    if p.get("type") == "eval":
        return "eval"
    return "-"


def ratio(part: Any, whole: Any) -> float | None:
    """part / whole for finite numbers with whole > 0 (None otherwise, never an overflow)."""
    if isinstance(part, bool) or isinstance(whole, bool) or not isinstance(part, int | float) \
            or not isinstance(whole, int | float):
        return None
    a, b = finite(part), finite(whole)
    return a / b if a is not None and b is not None and b > 0 else None


def fmt_amount(value: float) -> str:
    """A resource amount as short as it goes: ``2`` GPUs, ``0.5`` CPU."""
    return f"{value:g}"


def indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def describe_event(event: Mapping[str, Any], *, steps: bool = False) -> str | None:
    """One line for an event (None: not worth a line, e.g. step progress unless ``steps``)."""
    etype, data = event.get("type"), event.get("data") or {}
    if not isinstance(data, Mapping):
        data = {"raw": data}
    if etype == "state":
        parts = [fmt_value(data.get("state", "?"))]
        if data.get("from"):
            parts[0] = f"{fmt_value(data['from'])} -> {parts[0]}"
        if data.get("attempt"):
            parts.append(f"attempt {fmt_value(data['attempt'])}")
        if data.get("worker"):
            parts.append(f"worker {fmt_value(data['worker'])}")
        for key in ("reason", "error"):
            if data.get(key):
                parts.append(f"{key}: {fmt_value(data[key])}")
        if data.get("delay"):
            parts.append(f"retry in {fmt_num(data['delay'], '.0f')} s")
        return "state     " + "  ".join(parts)
    if etype == "log":
        level = fmt_value(data.get("level", "info"))
        msg = fmt_value(data.get("message", data.get("raw", "")))
        shown = ("level", "message") if "message" in data else ("level", "raw")
        extra = {k: v for k, v in data.items() if k not in shown}
        if extra:
            msg += "  " + " ".join(f"{k}={fmt_value(v)}" for k, v in extra.items())
        return f"{level:<9} {msg}"
    if etype == "progress":
        ptype = data.get("type")
        if ptype == "epoch":
            return "epoch     " + epoch_line(data)
        if ptype == "eval":
            return "eval      " + eval_line(data)
        if steps and ptype == "step":
            return (f"step      ep {data.get('epoch', '?')} step {data.get('step', '?')}/"
                    f"{data.get('steps_per_epoch', '?')} loss {fmt_num(data.get('loss'))} "
                    f"acc {fmt_pct(data.get('accuracy'))}")
        if ptype not in ("step", "epoch", "eval"):
            return "progress  " + fmt_value(data)
        return None
    if etype == "result":
        return "result    recorded"
    return f"{fmt_value(etype):<9} {fmt_value(data)}"


def epoch_line(data: Mapping[str, Any]) -> str:
    parts = [f"{data.get('epoch', '?')}/{data.get('epochs', '?')}",
             f"loss {fmt_num(first(data, 'loss', 'train_loss'))}",
             f"train acc {fmt_pct(first(data, 'accuracy', 'train_accuracy'))}"]
    if data.get("val_accuracy") is not None:  # the validation split (a hold-out of the training set)
        parts.append(f"val acc {fmt_pct(data['val_accuracy'])}")
    test = data.get("test_accuracy")  # per-epoch test accuracy: only in results from before the val split
    if isinstance(test, dict):
        parts.append("test " + " ".join(f"{fmt_angle(a)} {fmt_pct(test[a])}" for a in angle_sorted(test)))
    elif test is not None:
        parts.append(f"test acc {fmt_pct(test)}")
    if data.get("images_per_second") is not None:
        parts.append(f"{fmt_num(data['images_per_second'], '.0f')} img/s")
    if data.get("lr") is not None:
        parts.append(f"lr {fmt_num(data['lr'], '.3g')}")
    return "  ".join(parts)


def eval_line(data: Mapping[str, Any]) -> str:
    acc = data.get("test_accuracy")
    if isinstance(acc, dict):
        return "  ".join(f"{fmt_angle(a)}: {fmt_pct(acc[a])}" for a in angle_sorted(acc))
    return f"accuracy {fmt_pct(acc)}"



# ----------------------------------------------------------------------------- a job's results


def _per_class_table(per_class: Mapping[str, Any]) -> str:
    angles = angle_sorted(per_class)
    columns = {a: per_class[a] if isinstance(per_class[a], list) else [] for a in angles}
    n = max((len(col) for col in columns.values()), default=0)
    rows = []
    for c in range(n):
        rows.append([str(c)] + [fmt_pct(columns[a][c]).rstrip("%") if c < len(columns[a]) else "-"
                                for a in angles])
    return table(["class", *(fmt_angle(a) for a in angles)], rows, right=range(len(angles) + 1))


def confusion_lines(confusion: Mapping[str, Any], k: int = 3) -> list[str]:
    """The k largest mistakes at each test angle, e.g. ``6→9 at 180°: 71 % of 6s (701 images)``;
    a malformed matrix (a broken record) is skipped, never a crash."""
    from capsnet_core.evaluate import top_confusions

    lines = []
    for angle in angle_sorted(confusion):
        matrix = confusion[angle]
        if not (isinstance(matrix, list) and matrix and all(isinstance(row, list) and len(row) == len(matrix)
                                                            and all(isinstance(v, int) for v in row)
                                                            for row in matrix)):
            continue
        worst = top_confusions(matrix, k)
        lines.append("; ".join(c.describe(angle) for c in worst) if worst else f"{fmt_angle(angle)}: no mistakes")
    return lines


def print_results(record: JobRecord) -> None:
    result = JobResult.read(record.result) or JobResult()
    echo(f"{record.id}  {record.kind} {record.model or ''}  {record.state}".rstrip())
    rot = result.rotation_accuracy
    if rot:
        echo("\nAccuracy by test rotation")
        rows = [(fmt_angle(a), fmt_pct(rot[a])) for a in angle_sorted(rot)]
        echo(indent(table(("angle", "accuracy"), rows, right=(0, 1))))
    suites = result.suite_accuracy
    if suites:
        echo("\nTest suites")
        echo(indent(table(("suite", "value"), [(k, _suite_value(k, v)) for k, v in suites.items()], right=(1,))))
    per_class = result.per_class
    if per_class:
        echo("\nPer-class accuracy (%), rows = classes, columns = test rotation")
        echo(indent(_per_class_table(per_class)))
    confusion = result.confusion
    if confusion:
        lines = confusion_lines(confusion)
        if lines:
            echo("\nTop confusions (true→predicted, share of the true class) by test rotation")
            echo(indent("\n".join(lines)))
    history = result.history
    if history:
        echo("\nTraining curve")
        rows = []
        for h in history:
            if not isinstance(h, dict):
                continue
            rows.append((fmt_value(h.get("epoch", "-")), fmt_num(h.get("train_loss")), fmt_pct(h.get("train_accuracy")),
                         fmt_pct(h.get("val_accuracy")),
                         fmt_num(h.get("images_per_second"), ".0f"), fmt_num(h.get("lr"), ".3g"),
                         fmt_num(h.get("epoch_seconds"), ".1f")))
        echo(indent(table(("epoch", "loss", "train acc", "val acc", "img/s", "lr", "seconds"), rows,
                                 right=range(7))))
    matrix = tune_models(result)
    if isinstance(matrix, dict):
        for model, m in matrix.items():
            if not isinstance(m, dict):
                continue
            echo(f"\n{model}: accuracy (%) mean ± std; rows = training augmentation, columns = test rotation")
            cols = m.get("cols") if isinstance(m.get("cols"), list) else []
            mean, std = m.get("mean") or [], m.get("std") or []
            best_by_col = m.get("best_by_col") if isinstance(m.get("best_by_col"), dict) else {}
            rows = []
            for i, label in enumerate(m.get("rows") if isinstance(m.get("rows"), list) else []):
                cells = []
                for j, col in enumerate(cols):
                    mu = grid_cell(mean, i, j)
                    sd = grid_cell(std, i, j)
                    mark = " *" if best_by_col.get(printable(col)) == label else ""
                    cells.append("-" if mu is None else f"{100 * mu:.2f}" + (f" ± {100 * sd:.2f}" if sd else "") + mark)
                rows.append([fmt_value(label), *cells])
            echo(indent(table(["augment", *(fmt_angle(c) for c in cols)], rows,
                                     right=range(1, len(cols) + 1))))
            echo("  * best in its column")
            if "rotation_auc" in cols:
                echo("  rotation_auc: area under accuracy against angle over 0-180° / 180, shown x 100")
            if m.get("best_checkpoint"):
                echo(f"  best checkpoint: {m['best_checkpoint']}  (capsctl eval <it> --angles ...)")
    extra: dict[str, Any] = {k: v for k, v in (("world_size", result.world_size), ("device", result.device),
                                               ("model", result.model)) if v is not None}
    if result.trials is not None:
        extra["trials"] = len(result.trials)
    if extra:
        echo("\n" + "  ".join(f"{k} {fmt_value(v)}"
                                    for k, v in extra.items()))
    if matrix is not None:  # a tune job: its best checkpoint per model is named above; no job checkpoint
        artifacts = result.artifacts or {}
        if artifacts.get("csv"):
            echo(f"Matrix CSV: {printable(artifacts['csv'])}")
        echo_tensorboard(result)
        return
    checkpoint = result.checkpoint or record.checkpoint
    echo(f"\nCheckpoint: {checkpoint or '-'}")
    echo_tensorboard(result)


def echo_tensorboard(result: JobResult) -> None:
    """The command that shows the job's curves: a train job's own event files, or the Tune
    experiment folder, where Ray Tune's logger writes one set per trial (local storage only)."""
    folder = result.tensorboard
    if not folder and isinstance(result.experiment, str) and not is_uri(result.experiment):
        folder = result.experiment
    if isinstance(folder, str) and folder:
        echo(f"TensorBoard: tensorboard --logdir {printable(folder)}  (pip install tensorboard)")


SUITE_LABELS = {"rotation_auc": "rotation AUC 0-180° (trapezoid / 180)",
                "affine-mnist": "affine-MNIST accuracy (generated, seed 0)",
                "affnist": "affNIST accuracy (genuine, re-centred 28x28)"}


def _suite_value(key: str, value: Any) -> str:
    """A suite summary: the AUC as a fraction, accuracies in %, each with what it is."""
    text = fmt_num(value, ".3f") if key == "rotation_auc" else fmt_pct(value)
    return f"{text}  {SUITE_LABELS.get(key, '')}".rstrip()


def tune_models(result: JobResult) -> dict[str, Any] | None:
    """The per-model robustness matrices of a tune result."""
    return result.models if result.is_tune else None


def grid_cell(grid: Any, i: int, j: int) -> float | None:
    """``grid[i][j]`` as a finite number, None when it is missing or not one."""
    try:
        return finite(grid[i][j])
    except (TypeError, IndexError, KeyError):
        return None


def write_confusion_plot(record: JobRecord, path: Path, angle: str) -> Path:
    """The confusion matrix of a train/eval job at one test angle, as a PNG beside ``path``."""
    from capsnet_core import plots

    confusion = (JobResult.read(record.result) or JobResult()).confusion or {}
    key = next((a for a in confusion if _same_angle(a, angle)), None)
    if key is None:
        have = ", ".join(fmt_angle(a) for a in angle_sorted(confusion)) or "none"
        raise UserError(f"job {record.id} has no confusion matrix at {angle}° (it has: {have})")
    target = path.with_name(f"{path.stem}-confusion-{float(key):g}{path.suffix or '.png'}")
    return plots.plot_confusion_matrix(confusion[key], target,
                                       title=f"{record.model or record.kind} at {float(key):g}°: true vs predicted")


def _same_angle(key: str, angle: str) -> bool:
    try:
        return float(key) == float(angle)
    except ValueError:
        return False


def write_plots(record: JobRecord, path: Path, confusion_angle: str | None = None) -> list[Path]:
    """accuracy-vs-angle for train/eval jobs (and the confusion matrix at ``confusion_angle``);
    one heatmap per model for tune jobs."""
    from capsnet_core import plots

    result = JobResult.read(record.result) or JobResult()
    if confusion_angle is not None and not tune_models(result):
        confusion_plot = [write_confusion_plot(record, path, confusion_angle)]
    else:
        confusion_plot = []
    matrix = tune_models(result)
    if isinstance(matrix, dict) and matrix:
        out = []
        for model, m in matrix.items():
            target = path if len(matrix) == 1 else path.with_name(f"{path.stem}-{model}{path.suffix or '.png'}")
            grid = [[grid_cell(m.get("mean"), i, j) or 0.0 for j in range(len(m.get("cols") or []))]
                    for i in range(len(m.get("rows") or []))]
            out.append(plots.plot_robustness_heatmap(grid, [str(r) for r in m.get("rows") or []],
                                                     [str(c) for c in m.get("cols") or []], target,
                                                     title=f"{model}: accuracy by training augmentation"))
        return out
    rot = result.rotation_accuracy
    if not rot:
        raise UserError(f"job {record.id} has no accuracy by angle to plot")
    model = record.model or result.model
    spec = record.spec if isinstance(record.spec, dict) else {}
    job = record.name or record.id
    suites = result.suite_accuracy or {}
    label = curve_label(job, record.kind or "train", model, spec, suites.get("rotation_auc"))
    return [plots.plot_accuracy_vs_angle({label: rot}, path, title=plot_title(job, record.kind or "train", model, spec)),
            *confusion_plot]

