"""Training and evaluation throughput (images/s) and peak memory of LeNet5 and CapsNet.

    python benchmarks/bench_throughput.py                  # CPU, and CUDA when present
    python benchmarks/bench_throughput.py --device cuda --epoch   # + a timed full 60k-image epoch
    python benchmarks/bench_throughput.py --models capsnet --batch-size 100 \
        --reference ~/src/capsule-networks/capsule_network.py        # side by side with the reference

``--reference`` times the implementation the tutorial forked (Kenta Iwasaki's
gram-ai/capsule-networks; clone it yourself, its code is not part of this project) on the
same batches in the same run, so the speed-up is measured on one machine at one moment. It
runs in fresh processes: once as shipped, and once with the glibc malloc settings that
capsnet_core's CPU CapsNet switches on (``keep_freed_memory``), which speed up any model whose
steps allocate large temporaries, so the comparison separates the two effects.

Measures steady-state steps after warm-up on real MNIST batches with the shift2 augmentation,
i.e. exactly what ``capsnet_core.train.train_one_epoch`` does per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from capsnet_core import TrainConfig, build_model, load_dataset
from capsnet_core.augment import augment_batch, parse_preset
from capsnet_core.evaluate import autocast_context, configure_backends
from capsnet_core.train import train_one_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (RSS)"


def timed_training(train_step: Callable[[torch.Tensor, torch.Tensor], None], device: torch.device, batch: int,
                   steps: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Training images/s of ``train_step(images, labels)`` on real shift2-augmented MNIST batches
    (the first ``warmup`` steps untimed); also returns the images, for the eval timing."""
    data = load_dataset("mnist", "train")
    data = data.subset(min(len(data), batch * (steps + warmup)))
    images, labels = data.images.to(device), data.labels.to(device)
    batches = len(images) // batch  # large batches cycle through MNIST's 60,000 images
    if batches == 0:
        raise SystemExit(f"--batch-size {batch} is larger than MNIST's {len(images):,} training images")
    spec = parse_preset("shift2")
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        j = i % batches
        train_step(augment_batch(images[j * batch:(j + 1) * batch], spec), labels[j * batch:(j + 1) * batch])
    sync(device)
    return batch * steps / (time.perf_counter() - start), images


def measure(name: str, device: torch.device, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    torch.manual_seed(0)
    configure_backends(device)  # cuDNN autotuning on CUDA: the warm-up steps absorb its search
    model = build_model(name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast_context(device):
            out = model(x, y)
            loss = model.loss(out, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train_ips, images = timed_training(train_step, device, batch, steps, warmup)
    model.eval()
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            j = i % (len(images) // batch)
            x = augment_batch(images[j * batch:(j + 1) * batch], parse_preset("none"))
            with autocast_context(device):
                model(x).scores.argmax(1)
        sync(device)
    eval_ips = batch * steps / (time.perf_counter() - start)
    return train_ips, eval_ips


class _ReferenceTensor:
    """What ``Variable(t)`` is to the reference file: a wrapper whose ``.cuda()`` returns the tensor."""

    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor, self.device = tensor, device

    def cuda(self, *_: object, **__: object) -> torch.Tensor:
        return self.tensor.to(self.device)


def _reference_variable(device: torch.device) -> Callable[[torch.Tensor], _ReferenceTensor]:
    return lambda tensor, *_, **__: _ReferenceTensor(tensor, device)


def measure_reference(path: Path, device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """Training images/s of the reference CapsNet (gram-ai/capsule-networks' capsule_network.py).

    Its forward (in older versions: indexing 0-dim tensors with ``index.data[0]``, which modern torch rejects;
    later: building the decoder mask on CUDA only) is replaced: this calls its layers in the same order and
    picks the reconstruction target with one gather instead: that can only make the reference faster.
    """
    import torch.nn.functional as F

    spec_ = importlib.util.spec_from_file_location("reference_capsule_network", path)
    if spec_ is None or spec_.loader is None:
        raise SystemExit(f"--reference: cannot import {path}")
    ref = importlib.util.module_from_spec(spec_)
    # The file as shipped imports Variable only under ``if __name__ == "__main__":`` and its
    # layers call ``Variable(...).cuda()``: give its namespace a Variable whose .cuda() moves the
    # tensor to the measured device (on CUDA exactly what the original does; on CPU it stays put).
    # Names the file defines itself at import time would override this one.
    ref.Variable = _reference_variable(device)
    spec_.loader.exec_module(ref)
    torch.manual_seed(0)
    model = ref.CapsuleNet().to(device)
    criterion = ref.CapsuleLoss()
    optimizer = torch.optim.Adam(model.parameters())
    per_capsule_decoder = model.decoder[0].in_features == 16  # later versions decode all 10 masked capsules

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        onehot = torch.eye(10, device=device)[y]
        h = F.relu(model.conv1(x), inplace=True)
        h = model.primary_capsules(h)
        capsules = model.digit_capsules(h).squeeze().transpose(0, 1)  # (B, 10, 16)
        classes = F.softmax((capsules ** 2).sum(dim=-1) ** 0.5, dim=-1)
        decoder_in = (capsules[torch.arange(len(y), device=device), y] if per_capsule_decoder
                      else (capsules * onehot[:, :, None]).flatten(1))
        reconstructions = model.decoder(decoder_in)
        loss = criterion(x.flatten(1), onehot, classes, reconstructions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    return timed_training(train_step, device, batch, steps, warmup)[0]


# The malloc settings of capsnet_core.models.fftconv.keep_freed_memory, as glibc env vars.
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def reference_in_fresh_process(path: Path, device: str, batch: int, steps: int, extra_env: dict[str, str]) -> float:
    """measure_reference in a new interpreter, so nothing this process did (malloc settings,
    warmed caches) leaks into the reference's figure."""
    env = {**os.environ, **extra_env}
    out = subprocess.run([sys.executable, __file__, "--_reference-only", str(path), "--device", device,
                          "--batch-size", str(batch), "--steps", str(steps)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def full_epoch(name: str, device: torch.device, batch: int) -> float:
    torch.manual_seed(0)
    configure_backends(device)  # cuDNN autotuning on CUDA: the warm-up steps absorb its search
    model = build_model(name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = load_dataset("mnist", "train").to(device)
    config = TrainConfig(batch_size=batch)
    train_one_epoch(model, optimizer, data.subset(batch * 20), batch_size=batch, augment=parse_preset("shift2"),
                    epoch=0)  # warm-up (cuDNN autotuning, allocator)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(model, optimizer, data, batch_size=config.batch_size, augment=parse_preset("shift2"), epoch=1)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 8 on CPU, 50 on CUDA)")
    parser.add_argument("--models", default="lenet5,capsnet")
    parser.add_argument("--epoch", action="store_true", help="also time one full 60,000-image training epoch")
    parser.add_argument("--reference", type=Path, default=None,
                        help="capsule_network.py of gram-ai/capsule-networks: time it too, on the same batches")
    parser.add_argument("--_reference-only", dest="reference_only", type=Path, default=None,
                        help=argparse.SUPPRESS)  # internal: one reference measurement, printed alone
    args = parser.parse_args()
    if args.reference_only is not None:
        print(measure_reference(args.reference_only, torch.device(args.device), args.batch_size,
                                args.steps or 8, warmup=3))
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"{'model':8} {'device':6} {'batch':>5} {'train img/s':>12} {'eval img/s':>11}  peak memory"
          + ("   60k epoch" if args.epoch else ""))
    for device_name in devices:
        device = torch.device(device_name)
        for name in args.models.split(","):
            steps = args.steps or (50 if device.type == "cuda" else (30 if name == "lenet5" else 8))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train_ips, eval_ips = measure(name, device, args.batch_size, steps, warmup=3)
            line = f"{name:8} {device_name:6} {args.batch_size:>5} {train_ips:>12.1f} {eval_ips:>11.1f}  {peak_memory(device)}"
            if args.epoch:
                line += f"   {full_epoch(name, device, args.batch_size):.2f} s"
            print(line, flush=True)
            if name == "capsnet" and args.reference is not None:
                for label, env in (("as shipped", {}), ("with the same malloc settings", KEEP_FREED_MEMORY_ENV)):
                    ref_ips = reference_in_fresh_process(args.reference, device_name, args.batch_size, steps, env)
                    print(f"{'ref':8} {device_name:6} {args.batch_size:>5} {ref_ips:>12.1f} {'':>11}  reference "
                          f"CapsNet {label}: capsnet_core trains {train_ips / ref_ips:.2f}x as fast", flush=True)


if __name__ == "__main__":
    main()
