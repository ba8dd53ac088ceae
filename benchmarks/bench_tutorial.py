"""The tutorial's experiment on full MNIST: train on ±2 px shifts, test upright and rotated.

    python benchmarks/bench_tutorial.py                           # LeNet5, 10 epochs; CapsNet 1 epoch
    python benchmarks/bench_tutorial.py --capsnet-epochs 30 --device cuda   # to convergence on a GPU

Prints accuracy at each test angle next to the tutorial's reported figures, the time per
epoch, and writes an accuracy-versus-angle plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs without installing (GPU machine)

from capsnet_core import TrainConfig, build_model, fit, load_dataset  # noqa: E402
from capsnet_core.plots import plot_accuracy_vs_angle  # noqa: E402

TUTORIAL = {"lenet5": {"0": 98.68, "35": 76.05}, "capsnet": {"0": 99.37, "15": 92.12}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--angles", default="0,15,35")
    parser.add_argument("--lenet5-epochs", type=int, default=10)
    parser.add_argument("--capsnet-epochs", type=int, default=1)
    parser.add_argument("--capsnet-train-subset", type=int, default=None, help="first N training images only")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-decay", type=float, default=0.96)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    angles = tuple(float(a) for a in args.angles.split(","))
    device = torch.device(args.device)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    curves, rows = {}, []
    for name, epochs, subset in (("lenet5", args.lenet5_epochs, None),
                                 ("capsnet", args.capsnet_epochs, args.capsnet_train_subset)):
        if epochs <= 0:
            continue
        torch.manual_seed(0)
        model = build_model(name).to(device)
        config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                             augment="shift2", eval_angles=angles, eval_every=0)

        def show(event: dict, name: str = name) -> None:
            if event["type"] == "epoch":
                print(f"  {name} epoch {event['epoch']}/{event['epochs']}: loss {event['train_loss']:.4f} "
                      f"train acc {100 * event['train_accuracy']:.2f} %, {event['epoch_seconds']:.1f} s, "
                      f"{event['images_per_second']:.0f} img/s", flush=True)

        started = time.perf_counter()
        result = fit(model, train.subset(subset), test, config, on_progress=show)
        seconds = time.perf_counter() - started
        curves[f"{name} ({epochs} ep)"] = result.rotation_accuracy
        rows.append((name, epochs, subset or len(train), result, seconds))

    print(f"\ndevice: {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), "
          f"batch {args.batch_size}, Adam lr {args.lr} decay {args.lr_decay}/epoch, augment shift2")
    header = "model    epochs  train imgs  " + "  ".join(f"{a:>6g}°" for a in angles) + "   s/epoch   tutorial"
    print(header)
    for name, epochs, n, result, seconds in rows:
        accs = "  ".join(f"{100 * result.rotation_accuracy[f'{a:g}']:6.2f}%" for a in angles)
        ref = ", ".join(f"{v:.2f} % at {k}°" for k, v in TUTORIAL[name].items())
        print(f"{name:8} {epochs:6d} {n:11d}  {accs}   {seconds / epochs:7.1f}   {ref}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_angle(curves, out / "tutorial_accuracy_vs_angle.png",
                           reference={f"tutorial {k}": {float(a): v / 100 for a, v in r.items()}
                                      for k, r in TUTORIAL.items()})
    (out / "tutorial.json").write_text(json.dumps({name: {"epochs": e, "train_images": n, "seconds": s,
                                                          "rotation_accuracy": r.rotation_accuracy}
                                                   for name, e, n, r, s in rows}, indent=2))
    print(f"plot: {out / 'tutorial_accuracy_vs_angle.png'}")


if __name__ == "__main__":
    main()
