"""Time to accuracy: how many seconds of training each model needs to reach a target upright
accuracy on the held-out validation split, and what it then scores on the rotated test set.

    python benchmarks/bench_tta.py                                  # GPU if there is one, else CPU
    python benchmarks/bench_tta.py --device cuda --batch-size 512 --lr 3e-3 --compile reduce-overhead
    python benchmarks/bench_tta.py --device cpu --quick             # the smoke test the suite runs

Torch and this repository only (no Ray, no Redis): it runs on the GPU machine as it is. For each
model: the whole training set and the validation split resident on the device, Adam with
per-epoch decay, ``train_one_epoch`` (augmentation on the device, one host synchronisation per
epoch) until the validation accuracy reaches the model's target or ``--max-epochs`` pass; then
the test set at 0/15/35/45°. The validation split (``capsnet_core.validation``, 5,000 images by
default) decides when to stop; the test set is measured once, after. Reported per model:
training seconds to the target (validation passes excluded; wall time including them beside
it), epochs, final validation and test accuracies, training img/s, mean NVML GPU utilisation
while training (``nvidia-ml-py``; "-" where absent) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capsnet_core import build_model, load_dataset  # noqa: E402
from capsnet_core.compiled import maybe_compile  # noqa: E402
from capsnet_core.evaluate import configure_backends, evaluate  # noqa: E402
from capsnet_core.presets import parse_preset  # noqa: E402
from capsnet_core.train import train_one_epoch  # noqa: E402
from capsnet_core.validation import split_training_pool  # noqa: E402

# The goals of the GPU-sweeps issue: upright accuracy to reach, per model.
TARGETS = {"lenet5": 0.985, "effcaps": 0.995, "capsnet": 0.995, "resnet": 0.995, "c8cnn": 0.98}
TEST_ANGLES = (0.0, 15.0, 35.0, 45.0)
QUICK = {"train_subset": 3000, "val_split": 500, "test_subset": 500, "max_epochs": 2,
         "configs": {"capsnet": {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": (32, 64)}}}


class UtilisationSampler:
    """Mean NVML utilisation of one GPU while it runs, sampled every 50 ms in a thread."""

    def __init__(self, index: int) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # no driver or no package: report "-"
            self._nvml = None

    def __enter__(self) -> UtilisationSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


@dataclass
class TtaResult:
    model: str
    target: float
    reached: bool
    epochs: int
    train_seconds: float  # training steps only, to the epoch that reached the target
    wall_seconds: float  # the same plus the validation passes
    val_accuracy: float
    test_accuracy: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    gpu_utilisation: float | None = None
    peak_memory_bytes: int | None = None


def time_to_accuracy(name: str, train: Any, val: Any, test: Any, *, target: float, max_epochs: int,
                     batch_size: int, lr: float, lr_decay: float, augment: str, device: torch.device,
                     compile_mode: str, seed: int, config: dict[str, Any]) -> TtaResult:
    torch.manual_seed(seed)
    model = build_model(name, **config).to(device)
    trained = maybe_compile(model, compile_mode)  # eager again, logged, if compiling fails
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    spec = parse_preset(augment)
    train, val, test = train.to(device), val.to(device), test.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds, images, epochs, accuracy = 0.0, 0, 0, 0.0
    began = time.perf_counter()
    with UtilisationSampler(device.index or 0 if device.type == "cuda" else 0) as sampler:
        for epoch in range(max_epochs):
            stats = train_one_epoch(trained, optimizer, train, batch_size=batch_size, augment=spec, epoch=epoch,
                                    seed=seed, log_every=10**9)
            scheduler.step()
            train_seconds += stats["seconds"]
            images += stats["images"]
            epochs = epoch + 1
            accuracy = evaluate(model, val.images, val.labels).accuracy
            if accuracy >= target:
                break
    wall = time.perf_counter() - began
    tested = {f"{a:g}": evaluate(model, test.images, test.labels, angle=a).accuracy for a in TEST_ANGLES}
    return TtaResult(name, target, accuracy >= target, epochs, train_seconds, wall, accuracy, tested,
                     images / max(train_seconds, 1e-9), sampler.mean if device.type == "cuda" else None,
                     torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def table(results: list[TtaResult]) -> list[str]:
    header = ["model", "target (val)", "reached", "train s", "wall s", "epochs", "val acc",
              *(f"test {a:g}°" for a in TEST_ANGLES), "img/s", "GPU util", "peak mem"]
    rows = [header]
    for r in results:
        rows.append([r.model, f"{100 * r.target:.1f} %", "yes" if r.reached else "NO", f"{r.train_seconds:.1f}",
                     f"{r.wall_seconds:.1f}", str(r.epochs), f"{100 * r.val_accuracy:.2f} %",
                     *(f"{100 * r.test_accuracy[f'{a:g}']:.2f} %" for a in TEST_ANGLES), f"{r.images_per_second:,.0f}",
                     "-" if r.gpu_utilisation is None else f"{100 * r.gpu_utilisation:.0f} %",
                     "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f} GiB"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="lenet5,effcaps,capsnet")
    parser.add_argument("--target", action="append", default=[], metavar="MODEL=ACC",
                        help=f"validation accuracy to reach (repeatable; defaults {TARGETS})")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-decay", type=float, default=0.96)
    parser.add_argument("--augment", default="shift2")
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                        help="torch.compile the model first (reduce-overhead = CUDA graphs); warm-up is in the time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny data and models: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    targets = dict(TARGETS)
    for item in args.target:
        name, _, value = item.partition("=")
        targets[name] = float(value)
    device = torch.device(args.device)
    configure_backends(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    quick = QUICK if args.quick else {}
    pool = load_dataset("mnist", "train", root=args.data_dir)
    train, val, split = split_training_pool(pool, quick.get("val_split", args.val_split),
                                            quick.get("train_subset", args.train_subset))
    test = load_dataset("mnist", "test", root=args.data_dir).subset(quick.get("test_subset", args.test_subset))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"time to accuracy on {name}, torch {torch.__version__}: {len(train):,} training images, "
          f"validation split {split.size:,} (seed {split.seed}), {len(test):,} test images; batch {args.batch_size}, "
          f"Adam {args.lr:g} decay {args.lr_decay:g}/epoch, {args.augment}, compile {args.compile}", flush=True)
    results = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = time_to_accuracy(model_name, train, val, test, target=targets.get(model_name, 0.99),
                                  max_epochs=quick.get("max_epochs", args.max_epochs), batch_size=args.batch_size,
                                  lr=args.lr, lr_decay=args.lr_decay, augment=args.augment, device=device,
                                  compile_mode=args.compile, seed=args.seed,
                                  config=quick.get("configs", {}).get(model_name, {}))
        results.append(result)
        print(f"  {model_name}: {'reached' if result.reached else 'did not reach'} {100 * result.target:.1f} % "
              f"in {result.train_seconds:.1f} s ({result.epochs} epochs)", flush=True)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
