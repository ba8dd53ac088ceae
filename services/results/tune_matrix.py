"""The analysis of a finished tune job: the robustness matrix per model (``build_matrix``) and
its files (``write_artifacts``: CSV, JSON, a heatmap per model). Pure: no Ray, no torch (the
heatmap's matplotlib is imported when one is drawn), so ``capsctl`` can import it cheaply.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsnet_core.suites import angle_key

if TYPE_CHECKING:  # pydantic costs most of a second to import; the matrix only reads the spec
    from services.spec.jobspec import TuneSpec


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_matrix(spec: TuneSpec, finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: rows = training augmentation, columns = test angle, cells = mean/std/n over seeds.

    With several hyperparameter configs (lr, routing_iters) for a row, the row shows the config
    with the best mean final ``val_accuracy`` over its seeds (``selected``): accuracy on the
    validation split, a hold-out of the training set, so the cells (test accuracies) are not
    picked by the very numbers they report. The best trial is likewise the one with the highest
    ``val_accuracy`` (None when the job had no validation split); its test figures are reported.
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
        scored = [f for f in mine if f.get("rotation_accuracy") and f.get("val_accuracy") is not None]
        best = max(scored, key=lambda f: f["val_accuracy"], default=None)  # ties: the first trial
        models[model] = {
            "rows": rows, "cols": cols, "mean": mean, "std": std, "n": n, "early_stopped": early,
            "selected": selected, "best_by_col": best_by_col,
            "best_checkpoint": best["checkpoint"] if best else None,
            "best_trial": None if best is None else {
                "trial": best["key"], "augment": best["augment"], "lr": best["lr"],
                "routing_iters": best["routing_iters"], "seed": best["seed"], "epochs_trained": best["epochs_trained"],
                "val_accuracy": best["val_accuracy"], "rotation_accuracy": best["rotation_accuracy"],
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
