"""The leaderboard: every model, the tutorial's protocol, several seeds, one equal training budget.

    python benchmarks/bench_zoo.py --quick                    # smoke test, minutes on a CPU: near-chance models, no ordering
    python benchmarks/bench_zoo.py --device cuda --epochs 3 --train-subset 0   # the README leaderboard (one GPU)
    python benchmarks/bench_zoo.py                            # CPU, background: hours
    python benchmarks/bench_zoo.py --device cuda --epochs 5   # one GPU: minutes
    python benchmarks/bench_zoo.py --device cuda --trials-per-gpu 4   # 4 runs at once sharing the GPU

Protocol: train each model (full size, as ``build_model`` builds it) on MNIST for the same number
of epochs over the same training images, batch 128, Adam lr 1e-3 with 0.96 decay per epoch, under
each training augmentation (default ``shift2``, the tutorial's ±2 px shifts, and
``shift2+rot35``); then test on the full MNIST test set rotated 0..180 degrees in 15-degree steps
(rotation AUC) and on generated affine-MNIST. Every seed changes the initialisation and the
augmentation stream; the data are the same. Results are written as they come
(``<out>/zoo.json``), so an interrupted run continues where it stopped; the table and the
accuracy-against-angle plot (mean line, ± std band over seeds) are made from that file.
Torch and this repository only: it runs on the GPU machine (no Ray, no Redis).

``--trials-per-gpu K`` packs K runs on the device at once, as ``capsctl tune --gpus-per-trial
1/K`` does through Ray: K processes (spawned, so each has its own CUDA context) each train one
run at a time from the queue of runs left; the parent alone writes zoo.json. The small models are
launch-bound, so one run leaves the GPU mostly idle; on a CPU the cores are split between them.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capsnet_core import TrainConfig, build_model, count_parameters, fit, load_dataset  # noqa: E402
from capsnet_core.evaluate import predict  # noqa: E402
from capsnet_core.flops import training_flops_per_image  # noqa: E402
from capsnet_core.models import MODEL_NAMES  # noqa: E402
from capsnet_core.plots import plot_accuracy_curves, plot_pareto  # noqa: E402
from capsnet_core.stats import paired_difference  # noqa: E402
from capsnet_core.suites import ROTATION_SUITE_ANGLES  # noqa: E402

TABLE_ANGLES = ("0", "15", "30", "45", "90", "180")
# Rows that are a registered model with another decoder setting. Both capsule models train with
# their paper's reconstruction decoder by default (CapsNet's is in its config; Efficient-CapsNet's
# official training uses one too, 0.392 x MSE); the other setting is its own row, so the
# regulariser's effect is measured instead of confounding the comparison.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "effcaps+decoder": ("effcaps", {"decoder": True}),
    "capsnet-decoder": ("capsnet", {"decoder": False}),
}
ROW_NAMES = (*MODEL_NAMES, *VARIANTS)
# Order of the table: the tutorial's two models first, then the baselines it lacked.
DEFAULT_MODELS = ("lenet5", "capsnet", "capsnet-decoder", "effcaps+decoder", "effcaps", "resnet", "c8cnn")


def build_row_model(row: str) -> torch.nn.Module:
    """The model of a table row: a registered model, or one of its VARIANTS."""
    name, overrides = VARIANTS.get(row, (row, {}))
    return build_model(name, **overrides)


def classifier_parameters(model: torch.nn.Module) -> int:
    """Parameters without the reconstruction decoder (it only regularises training)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("decoder."))
QUICK = {"epochs": 1, "train_subset": 2000, "test_subset": 1000, "seeds": "0,1"}
FULL = {"epochs": 3, "train_subset": 20000, "test_subset": None, "seeds": "0,1,2"}


def run_key(model: str, augment: str, seed: int) -> str:
    return f"{model}|{augment}|{seed}"


BATCH = 128


def budget_steps(budget_flops: float, flops_per_image: float, batch: int = BATCH) -> int:
    """Optimizer steps a model may take for ``budget_flops`` of training (at least one)."""
    return max(1, math.floor(budget_flops / (flops_per_image * batch)))


def train_and_test(model_name: str, augment: str, seed: int, train: Any, test: Any, epochs: int,
                   device: torch.device, budget_flops: float | None = None) -> dict[str, Any]:
    """Train one row's model and test it; with ``budget_flops``, train until that many training
    FLOPs are spent (``epochs`` is then the cap), else for exactly ``epochs``."""
    torch.manual_seed(seed)
    model = build_row_model(model_name).to(device)
    flops_per_image = training_flops_per_image(model)
    max_steps = None
    if budget_flops is not None:
        max_steps = budget_steps(budget_flops, flops_per_image)
        epochs = min(epochs, math.ceil(max_steps / math.ceil(len(train) / BATCH)))
    config = TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, lr_decay=0.96, augment=augment, seed=seed,
                         eval_angles=ROTATION_SUITE_ANGLES, eval_suites=("rotation", "affine"), eval_every=0,
                         log_every=10**9, max_steps=max_steps)
    result = fit(model, train, test, config)
    images_trained = sum(int(h["images"]) for h in result.history)
    train_ips = statistics.fmean(e["images_per_second"] for e in result.history)
    model.eval()
    images = test.images.to(device)
    predict(model, images[:500])  # warm-up (cudnn autotuning, lazy buffers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    predict(model, images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    eval_ips = len(images) / (time.perf_counter() - began)
    return {"model": model_name, "augment": augment, "seed": seed, "parameters": count_parameters(model),
            "classifier_parameters": classifier_parameters(model),
            "rotation": result.rotation_accuracy, **result.suite_accuracy, "confusion": result.confusion,
            "per_class": result.per_class, "epochs_trained": len(result.history),
            "train_images_per_second": train_ips, "eval_images_per_second": eval_ips,
            "train_seconds": result.train_seconds, "train_flops_per_image": flops_per_image,
            "train_images": images_trained, "train_flops": flops_per_image * images_trained}


# One packed process's datasets, loaded once by _init_packed_process (see --trials-per-gpu).
_PACKED_DATA: tuple[Any, Any] | None = None


def _init_packed_process(data_dir: str | None, train_subset: int | None, test_subset: int | None,
                         threads: int) -> None:
    global _PACKED_DATA
    torch.set_num_threads(threads)  # K processes on a CPU share its cores instead of oversubscribing them
    train = load_dataset("mnist", "train", root=data_dir)
    test = load_dataset("mnist", "test", root=data_dir)
    _PACKED_DATA = (train.subset(train_subset) if train_subset else train,
                    test.subset(test_subset) if test_subset else test)


def _train_packed(name: str, augment: str, seed: int, epochs: int, device: str,
                  budget_flops: float | None) -> dict[str, Any]:
    assert _PACKED_DATA is not None, "the pool's initializer loads the data"
    train, test = _PACKED_DATA
    return train_and_test(name, augment, seed, train, test, epochs, torch.device(device), budget_flops)


def _print_run(key: str, r: dict[str, Any], seconds: float) -> None:
    print(f"  {key}: upright {100 * r['rotation']['0']:.1f} %, 45° {100 * r['rotation']['45']:.1f} %, "
          f"AUC {100 * r['rotation_auc']:.1f}, {seconds:.0f} s", flush=True)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: Sequence[float]) -> str:
    m, s = mean_std([100 * v for v in values])
    return f"{m:.1f} ± {s:.1f}"


def _classifier_count(run: dict[str, Any]) -> int:
    if "classifier_parameters" in run:
        return run["classifier_parameters"]
    return classifier_parameters(build_row_model(run["model"]))  # runs saved before the column existed


def table(runs: list[dict[str, Any]], augment: str, models: Sequence[str]) -> list[str]:
    header = ["model", "params", "w/o decoder", *(f"{a}°" for a in TABLE_ANGLES), "rot. AUC", "affine", "train img/s",
              "eval img/s", "MFLOP/img", "train TFLOP", "epochs", "train s", "seeds"]
    rows = [header]
    for name in models:
        mine = [r for r in runs if r["model"] == name and r["augment"] == augment]
        if not mine:
            continue
        affine_key = "affnist" if "affnist" in mine[0] else "affine-mnist"
        rows.append([name, f"{mine[0]['parameters']:,}", f"{_classifier_count(mine[0]):,}",
                     *(pct([r["rotation"][a] for r in mine]) for a in TABLE_ANGLES),
                     pct([r["rotation_auc"] for r in mine]), pct([r[affine_key] for r in mine]),
                     f"{statistics.fmean(r['train_images_per_second'] for r in mine):,.0f}",
                     f"{statistics.fmean(r['eval_images_per_second'] for r in mine):,.0f}",
                     f"{mine[0]['train_flops_per_image'] / 1e6:,.1f}" if "train_flops_per_image" in mine[0] else "-",
                     f"{statistics.fmean(r['train_flops'] for r in mine) / 1e12:,.2f}" if "train_flops" in mine[0] else "-",
                     f"{statistics.fmean(r.get('epochs_trained', 0) for r in mine):g}" if "epochs_trained" in mine[0] else "-",
                     f"{statistics.fmean(r['train_seconds'] for r in mine):,.0f}", str(len(mine))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return lines


PAIRED_COLUMNS = ("0", "45", "90", "auc", "affine")


def _metric(run: dict[str, Any], column: str) -> float:
    if column == "auc":
        return run["rotation_auc"]
    if column == "affine":
        return run["affnist"] if "affnist" in run else run["affine-mnist"]
    return run["rotation"][column]


def paired_table(runs: list[dict[str, Any]], augment: str, models: Sequence[str]) -> list[str]:
    """Every pair of models: mean difference A - B in points over the seeds both ran, with its
    95 % paired-t interval; ``*`` where the interval excludes zero. This backs every
    "A beats B" the README states."""
    by_model = {name: {r["seed"]: r for r in runs if r["model"] == name and r["augment"] == augment}
                for name in models}
    header = ["A - B (points)", *(f"{c}°" if c.isdigit() else c for c in PAIRED_COLUMNS), "seeds"]
    rows = [header]
    for i, first in enumerate(models):
        for second in models[i + 1:]:
            seeds = sorted(set(by_model[first]) & set(by_model[second]))
            if not seeds:
                continue
            cells = [paired_difference([_metric(by_model[first][s], c) for s in seeds],
                                       [_metric(by_model[second][s], c) for s in seeds]).describe()
                     for c in PAIRED_COLUMNS]
            rows.append([f"{first} - {second}", *cells, str(len(seeds))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return lines


def curves(runs: list[dict[str, Any]], augment: str, models: Sequence[str]) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for name in models:
        mine = [r for r in runs if r["model"] == name and r["augment"] == augment]
        if mine:
            angles = [a for a in mine[0]["rotation"] if all(a in r["rotation"] for r in mine)]
            out[name] = {a: mean_std([r["rotation"][a] for r in mine]) for a in angles}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny budget: {QUICK['epochs']} epoch over {QUICK['train_subset']} images, "
                             f"{QUICK['test_subset']} test images, seeds {QUICK['seeds']}")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--augment", default="shift2,shift2+rot35", help="training augmentations, comma-separated")
    parser.add_argument("--seeds", default=None, help=f"comma-separated (default {FULL['seeds']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {FULL['epochs']}")
    parser.add_argument("--train-subset", type=int, default=None,
                        help=f"first N training images (default {FULL['train_subset']}; 0 = all 60,000)")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images (default all 10,000)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/zoo")
    parser.add_argument("--report-only", action="store_true", help="print the table and plot from zoo.json")
    parser.add_argument("--budget-flops", type=float, default=None,
                        help="equal-compute mode: every model trains until it has spent this many training FLOPs "
                             "(FlopCounterMode's count per image x images), --epochs is then the cap")
    parser.add_argument("--trials-per-gpu", type=int, default=1, metavar="K",
                        help="train K runs at once in K processes sharing the device (default 1: one at a time)")
    args = parser.parse_args(argv)
    if args.trials_per_gpu < 1:
        parser.error(f"--trials-per-gpu: must be at least 1 (got {args.trials_per_gpu})")
    base = QUICK if args.quick else FULL
    # In equal-compute mode --epochs is only a cap: high enough that small models spend the budget.
    epochs = args.epochs if args.epochs is not None else (50 if args.budget_flops else base["epochs"])
    train_subset = args.train_subset if args.train_subset is not None else base["train_subset"]
    test_subset = args.test_subset if args.test_subset is not None else base["test_subset"]
    seeds = [int(s) for s in (args.seeds or base["seeds"]).split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ROW_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ROW_NAMES)}")
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "zoo.json"
    saved = json.loads(store.read_text()) if store.is_file() else {"runs": {}}
    train = load_dataset("mnist", "train", root=args.data_dir)
    test = load_dataset("mnist", "test", root=args.data_dir)
    train = train.subset(train_subset) if train_subset else train
    test = test.subset(test_subset) if test_subset else test
    spend = (f"{args.budget_flops:.3g} training FLOPs per run (at most {epochs} epochs)" if args.budget_flops
             else f"{epochs} epoch(s)")
    budget = (f"budget: {spend} over {len(train):,} MNIST training images (batch 128, Adam 1e-3, "
              f"decay 0.96/epoch), tested on {len(test):,} test images, seeds {','.join(map(str, seeds))}, "
              f"{device.type}")
    if saved.get("budget") not in (None, budget):
        parser.error(f"{store} holds runs of another budget ({saved['budget']}); use another --out")
    saved["budget"] = budget
    print(budget, flush=True)
    # Seed-major: an interrupted run still has every model under every augmentation.
    pending = [(name, augment, seed) for seed in seeds for augment in augments for name in models
               if run_key(name, augment, seed) not in saved["runs"]]
    if args.report_only:
        pending = []
    sweep_began = time.perf_counter()
    if args.trials_per_gpu == 1:
        for name, augment, seed in pending:
            began = time.perf_counter()
            key = run_key(name, augment, seed)
            saved["runs"][key] = train_and_test(name, augment, seed, train, test, epochs, device, args.budget_flops)
            store.write_text(json.dumps(saved, indent=1))
            _print_run(key, saved["runs"][key], time.perf_counter() - began)
    elif pending:
        k = args.trials_per_gpu
        threads = max(1, (os.cpu_count() or 1) // k)
        with ProcessPoolExecutor(max_workers=k, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_packed_process,
                                 initargs=(args.data_dir, train_subset, test_subset, threads)) as pool:
            futures = {pool.submit(_train_packed, name, augment, seed, epochs, args.device, args.budget_flops):
                       run_key(name, augment, seed) for name, augment, seed in pending}
            for future in as_completed(futures):
                key = futures[future]
                saved["runs"][key] = {**future.result(), "trials_per_gpu": k}
                store.write_text(json.dumps(saved, indent=1))
                _print_run(key, saved["runs"][key], saved["runs"][key]["train_seconds"])
    if pending:
        print(f"sweep: {len(pending)} run(s) in {time.perf_counter() - sweep_began:.1f} s wall, "
              f"{args.trials_per_gpu} at once on {device.type}", flush=True)
    runs = list(saved["runs"].values())
    for augment in augments:
        print(f"\ntrained with {augment}; accuracy % mean ± std over seeds; {budget}")
        print("\n".join(table(runs, augment, models)))
        print(f"\npaired differences over seeds, trained with {augment}: mean [95 % t interval], "
              "* = the interval excludes 0")
        print("\n".join(paired_table(runs, augment, models)))
        plot = plot_accuracy_curves(curves(runs, augment, models), out / f"zoo_{augment.replace('+', '_')}.png",
                                    title=f"Trained with {augment}: accuracy on the rotated test set")
        print(f"plot: {plot}")
        points = [(r["model"], r["train_flops"], r["rotation_auc"], r["rotation"]["0"]) for r in runs
                  if r["augment"] == augment and "train_flops" in r and r["model"] in models]
        if points:
            pareto = plot_pareto(points, out / f"pareto_{augment.replace('+', '_')}.png",
                                 title=f"Trained with {augment}: accuracy against training compute")
            print(f"plot: {pareto}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
