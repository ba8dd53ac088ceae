"""Pictures a person would rather look at than a table (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .augment import rotate  # noqa: E402
from .models.base import unwrap  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


CHANCE = 10.0  # % correct by guessing one of MNIST's ten classes


def readable_ticks(angles: Sequence[float], max_labels: int = 13) -> list[float]:
    """A subset of the angles to label so that no two labels collide: labelled ticks at least
    1/``max_labels`` of the range apart (the first and the last angle always kept)."""
    ordered = sorted(set(angles))
    if len(ordered) <= 2:
        return ordered
    gap = (ordered[-1] - ordered[0]) / max_labels
    kept = [ordered[0]]
    for angle in ordered[1:-1]:
        if angle - kept[-1] >= gap and ordered[-1] - angle >= gap:
            kept.append(angle)
    return [*kept, ordered[-1]]


def _accuracy_axes(ax: plt.Axes, angles: Sequence[float], title: str) -> None:
    """The one style of every accuracy-against-angle figure: 0-100 %, a dashed chance line,
    ticks that never overlap."""
    ax.set_ylim(0, 101)
    ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (10 %)")
    ticks = readable_ticks(angles)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{a:g}°" for a in ticks])
    ax.set_xlabel("test rotation")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_angle(runs: Mapping[str, Mapping[str | float, float]], path: str | Path,
                           title: str = "Accuracy on the rotated test set",
                           reference: Mapping[str, Mapping[float, float]] | None = None) -> Path:
    """One line per run: accuracy (%) against test rotation angle. runs: {label: {angle: accuracy 0..1}}.

    reference: optional published points drawn as markers, e.g. {"tutorial LeNet5": {0: .9868, 35: .7605}}.
    """
    return plot_accuracy_curves({label: {a: (acc, None) for a, acc in curve.items()} for label, curve in runs.items()},
                                path, title=title, reference=reference)


@torch.no_grad()
def plot_rotated_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, angle: float,
                      path: str | Path, classes: Sequence[str] | None = None, count: int = 16) -> Path:
    """A grid of test digits rotated by `angle`, titled predicted/true (red when wrong)."""
    bare = unwrap(model).eval()
    device = next(bare.parameters()).device
    x = rotate(images[:count].to(device), angle)
    predicted = bare(x).scores.argmax(dim=1).cpu()
    names = classes or [str(i) for i in range(10)]
    cols = min(8, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= x.shape[0]:
            continue
        ax.imshow(x[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ok = int(predicted[i]) == int(labels[i])
        ax.set_title(f"{names[int(predicted[i])]} / {names[int(labels[i])]}", fontsize=8,
                     color="black" if ok else "red")
    fig.suptitle(f"test digits rotated {angle:g}°: predicted / true")
    return _save(fig, path)


@torch.no_grad()
def plot_reconstructions(model: nn.Module, images: torch.Tensor, path: str | Path, angle: float = 0.0,
                         count: int = 8) -> Path:
    """CapsNet inputs (top row) and their reconstructions from the longest digit capsule (bottom)."""
    bare = unwrap(model).eval()
    device = next(bare.parameters()).device
    x = rotate(images[:count].to(device), angle)
    out = bare(x)
    if out.reconstructions is None:
        raise ValueError(f"model {bare.name!r} has no decoder, so there are no reconstructions to plot")
    fig, axes = plt.subplots(2, x.shape[0], figsize=(1.2 * x.shape[0], 2.6), squeeze=False)
    for i in range(x.shape[0]):
        for row, img in ((0, x[i, 0]), (1, out.reconstructions[i, 0].float())):
            axes[row, i].imshow(img.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    fig.suptitle("input (top) and CapsNet reconstruction (bottom)")
    return _save(fig, path)


def _column_label(column: str) -> str:
    """A test angle as "35°"; a suite summary column (rotation_auc, affine-mnist) as its name."""
    try:
        return f"{float(column):g}°"
    except ValueError:
        return str(column)


def plot_robustness_heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
                            col_labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Rows = training augmentation, columns = test angle (or a suite's summary), cells 0..1 shown x 100."""
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 2.5, 0.6 * len(row_labels) + 1.5))
    data = torch.tensor([[100 * float(v) for v in row] for row in matrix])
    im = ax.imshow(data.numpy(), cmap="viridis", vmin=max(0.0, float(data.min()) - 5), vmax=100, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [_column_label(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("test rotation / suite")
    ax.set_ylabel("training augmentation")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{float(data[i, j]):.1f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title)
    return _save(fig, path)


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], path: str | Path, title: str = "") -> Path:
    """Rows = true class, columns = predicted class; each row as % of its class (the diagonal is its accuracy)."""
    counts = torch.tensor([[float(v) for v in row] for row in confusion])
    shares = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = shares.shape[0]
    fig, ax = plt.subplots(figsize=(0.6 * n + 2.5, 0.6 * n + 1.5))
    im = ax.imshow(shares.numpy(), cmap="magma_r", vmin=0, vmax=100)
    ax.set_xticks(range(n), [str(i) for i in range(n)])
    ax.set_yticks(range(n), [str(i) for i in range(n)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            if shares[i, j] >= 0.5:
                ax.text(j, i, f"{float(shares[i, j]):.0f}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 50 else "black")
    fig.colorbar(im, ax=ax, label="% of the true class")
    ax.set_title(title)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (less cost, more accuracy), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(points: Sequence[tuple[str, float, float, float]], path: str | Path, title: str = "") -> Path:
    """(model, training FLOPs, rotation AUC, upright accuracy) per run: two panels against log FLOPs,
    one colour per model, the Pareto front of each panel drawn as a step line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    models = list(dict.fromkeys(p[0] for p in points))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    for ax, column, label in ((axes[0], 2, "rotation AUC (%)"), (axes[1], 3, "upright accuracy (%)")):
        for model in models:
            mine = [p for p in points if p[0] == model]
            ax.scatter([p[1] for p in mine], [100 * p[column] for p in mine], color=colours[model], label=model, s=36)
        xy = [(p[1], 100 * p[column]) for p in points]
        front = [xy[i] for i in pareto_front(xy)]
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="grey", linestyle="--",
                linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no colliding labels
        ax.set_xlabel("training FLOPs (FlopCounterMode, per run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_curves(curves: Mapping[str, Mapping[str | float, tuple[float, float | None]]], path: str | Path,
                         title: str = "Accuracy on the rotated test set",
                         reference: Mapping[str, Mapping[float, float]] | None = None) -> Path:
    """Several runs overlaid: accuracy (%) against test rotation, with a ± std band where a run has one.

    curves: {label: {angle: (mean accuracy 0..1, std 0..1 or None)}}; a run draws only the angles it has.
    Each run has its own marker, and later runs draw smaller hollow markers over earlier ones, so a
    curve lying exactly on another stays visible.
    """
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    markers = "osD^v<>ph*"
    all_angles: set[float] = set()
    for i, (label, curve) in enumerate(curves.items()):
        points = sorted((float(a), 100 * float(m), None if s is None else 100 * float(s))
                        for a, (m, s) in curve.items())
        if not points:
            continue
        all_angles.update(p[0] for p in points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        line, = ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.8, markersize=max(3.0, 7.0 - 1.2 * i),
                        markerfacecolor="none" if i % 2 else None, label=label, zorder=2 + i)
        if any(p[2] for p in points):
            sd = [p[2] or 0.0 for p in points]
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)],
                            [y + s for y, s in zip(ys, sd, strict=True)], color=line.get_color(), alpha=0.18,
                            linewidth=0)
    for label, curve in (reference or {}).items():
        points = sorted((float(a), 100 * float(acc)) for a, acc in curve.items())
        all_angles.update(p[0] for p in points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker="x", s=60, label=label, zorder=20)
    _accuracy_axes(ax, sorted(all_angles), title)
    if curves or reference:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False,
                  ncol=1 if len(curves) < 5 else 2)  # below the axes: never over a curve
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path,
                         title: str = "Training curve") -> Path:
    """Loss (left) and accuracy (right, 0-100 % with the chance line) per epoch, train and
    validation; history: the per-epoch records of ``capsnet_core.fit`` (``train_loss``,
    ``val_loss``, ``train_accuracy``, ``val_accuracy``, accuracies 0..1). A series a run did
    not measure (no validation split) is left out."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    records = [r for r in history if isinstance(r.get("epoch"), int | float)]
    for ax, scale, series in ((loss_ax, 1.0, (("train_loss", "train"), ("val_loss", "validation"))),
                              (acc_ax, 100.0, (("train_accuracy", "train"), ("val_accuracy", "validation")))):
        for i, (key, label) in enumerate(series):
            points = [(float(r["epoch"]), scale * float(r[key])) for r in records
                      if isinstance(r.get(key), int | float)]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="os"[i], linewidth=1.8,
                        markerfacecolor="none" if i else None, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole epochs only
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("loss")
    loss_ax.set_ylim(bottom=0)
    acc_ax.set_ylim(0, 101)
    acc_ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (10 %)")
    acc_ax.set_ylabel("accuracy (%)")
    for ax in (loss_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
