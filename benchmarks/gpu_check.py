"""GPU readiness in one command: torch, numpy and this repository only (no Ray, no Redis).

    python benchmarks/gpu_check.py                 # on a GPU machine: < 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU-only parts (run by the test suite)

For every registered model: forward/backward agreement of the device path with the CPU path
(same weights, same batch; fp32), training img/s in fp32 and under bf16 autocast, and a timed
full MNIST epoch (``train_one_epoch``, 60,000 images; ``--quick``: 512). Then the issue-14
checks: a checkpoint resumed through the code path a GPU rank takes (``resume_training`` onto
the device, RNG state restored), DDP with our options broadcasting no buffers (a 1-process NCCL
group on CUDA, gloo on CPU, via ``torch.distributed``), and ``cudnn.benchmark`` on after
``fit``. Prints one table; any mismatch prints one line ``FAILED: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capsnet_core import TrainConfig, build_model, fit, load_dataset  # noqa: E402
from capsnet_core.augment import parse_preset  # noqa: E402
from capsnet_core.checkpoint import resume_training, save_checkpoint  # noqa: E402
from capsnet_core.evaluate import autocast_context  # noqa: E402
from capsnet_core.models import MODEL_NAMES  # noqa: E402
from capsnet_core.train import ddp_options, train_one_epoch  # noqa: E402

# Small models for --quick (the test suite); the full check uses the full-size models.
QUICK_CONFIGS = {"capsnet": {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": (32, 64)}}
TOLERANCE = 2e-3  # relative, fp32 on both sides (TF32 is off for the comparison)


class CheckFailed(Exception):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_for(name: str, quick: bool) -> torch.nn.Module:
    return build_model(name, **(QUICK_CONFIGS.get(name, {}) if quick else {}))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def agreement(name: str, device: torch.device, quick: bool) -> float:
    """Max relative difference of scores, loss and gradients between the device and the CPU."""
    torch.manual_seed(0)
    cpu_model = model_for(name, quick).train()
    torch.manual_seed(0)
    dev_model = model_for(name, quick).to(device).train()
    dev_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    errors = []
    results = []
    for model, where in ((cpu_model, torch.device("cpu")), (dev_model, device)):
        xs, ys = x.to(where), y.to(where)
        out = model(xs, ys)
        loss = model.loss(out, xs, ys)
        loss.backward()
        results.append((out.scores, loss, {n: p.grad for n, p in model.named_parameters()}))
    (s0, l0, g0), (s1, l1, g1) = results
    errors += [relative_error(s1, s0), relative_error(l1, l0)]
    errors += [relative_error(g1[n], g0[n]) for n in g0 if g0[n] is not None]
    return max(errors)


def throughput(name: str, device: torch.device, amp: bool, quick: bool) -> float:
    torch.manual_seed(0)
    model = model_for(name, quick).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, steps, warmup = (16, 2, 1) if quick else (128, 30, 5)
    x, y = torch.rand(batch, 1, 28, 28, device=device), torch.arange(batch, device=device) % 10
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast_context(device, amp):
            out = model(x, y)
            loss = model.loss(out, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def full_epoch(name: str, device: torch.device, quick: bool, data_dir: str | None) -> float:
    train = load_dataset("mnist", "train", root=data_dir)
    train = train.subset(512) if quick else train
    torch.manual_seed(0)
    model = model_for(name, quick).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(model, optimizer, train.to(device), batch_size=128, augment=parse_preset("shift2"), epoch=0,
                    log_every=10**9)
    sync(device)
    return time.perf_counter() - start


def resume_check(device: torch.device, workdir: Path) -> str:
    """Save on the device, then resume onto it the way a rank does: the RNG stream must continue."""
    torch.manual_seed(0)
    model = build_model("lenet5").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(8, 1, 28, 28, device=device), torch.arange(8, device=device)
    model.loss(model(x), x, y).backward()
    optimizer.step()
    path = save_checkpoint(workdir / "resume.pt", model, optimizer, epoch=1)
    expected = torch.rand(4)
    torch.manual_seed(99)
    fresh = build_model("lenet5").to(device)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    resume_training(path, fresh, fresh_optimizer, None, device)
    if not torch.equal(torch.rand(4), expected):
        raise CheckFailed("resume: the RNG stream did not continue after resume_training")
    if not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)):
        raise CheckFailed("resume: weights differ after resume_training")
    return "ok"


def ddp_check(device: torch.device, workdir: Path) -> str:
    """One DDP step in a 1-process group (NCCL on CUDA): no buffer broadcast with our options."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{workdir / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = model_for("capsnet", quick=True).to(device)
        options = ddp_options(model)
        if options["broadcast_buffers"]:
            raise CheckFailed("ddp: CapsNet's constant DFT buffers would be broadcast every step")
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **options)
        x, y = torch.rand(4, 1, 28, 28, device=device), torch.arange(4, device=device)
        model.loss(ddp(x, y), x, y).backward()
        sync(device)
        if any(p.grad is None for p in model.parameters()):
            raise CheckFailed("ddp: a parameter got no gradient")
    finally:
        dist.destroy_process_group()
    return f"ok ({backend})"


def cudnn_check(device: torch.device, data_dir: str | None) -> str:
    torch.backends.cudnn.benchmark = False
    train = load_dataset("mnist", "train", root=data_dir).subset(256)
    fit(build_model("lenet5").to(device), train, None, TrainConfig(epochs=1, batch_size=128, eval_angles=()))
    if device.type == "cuda" and not torch.backends.cudnn.benchmark:
        raise CheckFailed("cudnn.benchmark is off after fit on CUDA")
    return "on" if torch.backends.cudnn.benchmark else "off (CPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small models and a 512-image epoch")
    parser.add_argument("--data-dir", default=os.environ.get("CAPSNET_DATA_DIR"))
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="a short time-to-accuracy row per model (bench_tta, at most 3 epochs; default: on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAILED: --device cuda but torch sees no GPU (use --device cpu for the CPU-only parts)")
        return 1
    # Compare true fp32 on both sides; the throughput rows below run with the defaults.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    began = time.perf_counter()
    rows = []
    try:
        for name in MODEL_NAMES:
            error = agreement(name, device, args.quick)
            if error > TOLERANCE:
                raise CheckFailed(f"{name}: {device} forward/backward differs from the CPU by {error:.2e} "
                                  f"(tolerance {TOLERANCE:g})")
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            fp32 = throughput(name, device, amp=False, quick=args.quick)
            bf16 = throughput(name, device, amp=True, quick=args.quick) if device.type == "cuda" else float("nan")
            epoch = full_epoch(name, device, args.quick, args.data_dir)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            rows.append((name, f"{error:.1e}", f"{fp32:,.0f}", f"{bf16:,.0f}" if bf16 == bf16 else "-",
                         f"{epoch:.1f}"))
            print(f"  {name}: done after {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            resume = resume_check(device, Path(tmp))
            ddp = ddp_check(device, Path(tmp))
        cudnn = cudnn_check(device, args.data_dir)
    except CheckFailed as err:
        print(f"FAILED: {err}")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}{', quick' if args.quick else ''}")
    header = ("model", "max rel. err vs CPU", "train img/s fp32", "train img/s bf16", "epoch s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"resume through the device path: {resume}; DDP step without buffer broadcast: {ddp}; "
          f"cudnn.benchmark after fit: {cudnn}; total {time.perf_counter() - began:.0f} s")
    if args.tta if args.tta is not None else device.type == "cuda":
        print("\n".join(tta_rows(device, args.quick, args.data_dir)))
    return 0


def tta_rows(device: torch.device, quick: bool, data_dir: str | None) -> list[str]:
    """Seconds of training to 98 % validation accuracy (at most 3 epochs), per model: the
    short form of bench_tta.py."""
    from benchmarks.bench_tta import QUICK, split_training_pool, table, time_to_accuracy

    pool = load_dataset("mnist", "train", root=data_dir)
    train, val, _ = split_training_pool(pool, QUICK["val_split"] if quick else 5000,
                                        QUICK["train_subset"] if quick else None)
    test = load_dataset("mnist", "test", root=data_dir).subset(QUICK["test_subset"] if quick else None)
    results = [time_to_accuracy(name, train, val, test, target=0.98, max_epochs=1 if quick else 3, batch_size=128,
                                lr=1e-3, lr_decay=0.96, augment="shift2", device=device, compile_mode="none", seed=0,
                                config=QUICK["configs"].get(name, {}) if quick else {})
               for name in MODEL_NAMES]
    return ["time to 98 % validation accuracy (at most 3 epochs, batch 128):", *table(results)]


if __name__ == "__main__":
    sys.exit(main())
