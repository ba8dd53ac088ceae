"""Data-parallel training throughput, side by side: where does distributed speed go?

    python benchmarks/bench_ddp.py                      # the README table (CPU, gloo): ~10 min on a quiet 2-core machine
    python benchmarks/bench_ddp.py --models capsnet --ranks 2 --steps 8 --repeats 1   # a quick look
    python benchmarks/bench_ddp.py --device cuda --ranks 1,2                          # GPUs, NCCL

For every model and rank count N, in one run, on the same model, global batch and data:

(a) ``one``:   one process, no DDP, N torch threads (the same cores as N one-thread ranks);
(b) ``ddp``:   plain ``torch.distributed`` DDP, N processes spawned here (gloo on CPU, NCCL on CUDA), no Ray;
(c) ``ray``:   Ray Train ``TorchTrainer`` with N workers calling ``capsnet_core.train.fit`` directly;
(d) ``capsctl``: a real job (``submit <model> --cpu-ranks N``, ``--gpus N`` on CUDA) through a private
    redis-server, the queue and a ``Worker`` (in this process) on the same local Ray as (c).

Extra paths for the investigation (``--paths``): ``ray-nice15`` is (c) with every rank lowering
its own priority to nice 15, which is what Ray does to its worker processes by default
(``RAY_worker_niceness``; capsctl starts Ray with 0).

Every path measures throughput the same way: all of them run ``capsnet_core.train.fit`` on every
rank, for ``--epochs`` epochs of ``--steps`` steps; the figure is rank 0's own timing of the
last epoch (``images_per_second`` of its history: global images / seconds of training steps),
so warm-up (the first epoch: allocator, DDP's first buckets), start-up (processes, Ray, data
loading) and evaluation are all excluded. With ``--repeats R`` the paths run interleaved R
times and the table shows medians: on a busy machine compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PATHS = {
    "one": "(a) one process, N threads",
    "ddp": "(b) torch.distributed DDP",
    "ray": "(c) Ray Train TorchTrainer",
    "capsctl": "(d) capsctl job",
    "ray-nice15": "(c) at Ray's default nice 15",
}
DEFAULT_STEPS = {"capsnet": 20, "lenet5": 100}


# ---------------------------------------------------------------------------------------- one rank


def train_rank(case: dict[str, Any], rank: int, world_size: int, device: torch.device,
               wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> dict[str, Any]:
    """What every path runs on each rank: the job's model, data and ``fit``, without evaluation.

    Returns the last epoch's history entry (its ``images_per_second`` is the figure)."""
    from capsnet_core import TrainConfig, build_model, fit, load_dataset

    if case.get("nice"):
        from services.runs.train import set_process_niceness

        set_process_niceness(case["nice"])  # raising one's own nice level is always allowed
    torch.manual_seed(case["seed"])
    model = wrap(build_model(case["model"]))
    train = load_dataset("mnist", "train").subset(case["steps"] * case["batch_size"])
    config = TrainConfig(epochs=case["epochs"], batch_size=case["batch_size"], lr=case["lr"], seed=case["seed"],
                         eval_every=0, eval_angles=())
    result = fit(model, train, None, config, rank=rank, world_size=world_size)
    return {**result.history[-1], "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}


def _spawned_rank(case: dict[str, Any]) -> None:
    """Entry point of a process spawned for paths (a) and (b); rank 0 prints its result as JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(case["threads"])
    cuda = case["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if case["path"] == "one":
        out = train_rank(case, 0, 1, device, lambda m: m.to(device))
    else:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        # DDP as Ray Train's prepare_model builds it (defaults), so (b) and (c) differ only in Ray.
        out = train_rank(case, rank, world_size, device, lambda m: DistributedDataParallel(
            m.to(device), device_ids=[rank] if cuda else None))
        dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def run_spawned(case: dict[str, Any], ranks: int) -> dict[str, Any]:
    """Paths (a) and (b): ``ranks`` fresh interpreters (one for (a)), no Ray anywhere."""
    from services.stack.processes import free_port

    world = 1 if case["path"] == "one" else ranks
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(case["threads"])}
        procs.append(subprocess.Popen([sys.executable, __file__, "--_rank", json.dumps(case)], env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, text=True))
    out, _ = procs[0].communicate()
    codes = [procs[0].returncode] + [p.wait() for p in procs[1:]]
    if any(codes):
        raise RuntimeError(f"{case['path']}: rank exit codes {codes}")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


# ---------------------------------------------------------------------------------------- Ray paths


def _ray_train_loop(case: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    out = train_rank(case, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                     ray.train.torch.prepare_model)
    # Train V2 keeps a result's metrics only with a checkpoint: rank 0 hands over an empty one.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if ctx.get_world_rank() == 0 else None
        ray.train.report(out, checkpoint=checkpoint)


def run_ray_train(case: dict[str, Any], ranks: int, storage: Path) -> dict[str, Any]:
    """Path (c): Ray Train alone, configured as capsctl's ``run_train_job`` configures it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cuda = case["device"] == "cuda"
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config=case,
        scaling_config=ScalingConfig(num_workers=ranks, use_gpu=cuda,
                                     resources_per_worker={"GPU": 1, "CPU": 1} if cuda else {"CPU": 1}),
        run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0)))
    return dict(trainer.fit().metrics)


def run_capsctl(case: dict[str, Any], ranks: int, queue: Any) -> dict[str, Any]:
    """Path (d): a real train job through Redis and the worker; its result's last epoch."""
    spec = {"kind": "train", "model": case["model"], "epochs": case["epochs"], "batch_size": case["batch_size"],
            "lr": case["lr"], "seed": case["seed"], "train_subset": case["steps"] * case["batch_size"],
            "test_subset": 100, "eval_angles": [0]}
    spec.update({"gpus": ranks} if case["device"] == "cuda" else {"cpu_ranks": ranks})
    job = queue.submit(spec)
    while (record := queue.get(job.id)) is None or not record.is_terminal:
        time.sleep(0.5)
    if record.state != "succeeded":
        raise RuntimeError(f"capsctl job {job.id} ended {record.state}: {getattr(record, 'error', '')}")
    return dict(record.result["history"][-1])


class Service:
    """A private redis-server, a local Ray started the way capsctl starts it, and a Worker thread."""

    def __init__(self, num_cpus: int, num_gpus: int) -> None:
        import ray

        from services.config import Settings, ray_node_env
        from services.stack.processes import free_port
        from services.worker.worker import Worker

        self.tmp = Path(tempfile.mkdtemp(prefix="capsctl-bench-ddp-"))
        port = free_port()
        self.redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                                       "--save", "", "--dir", str(self.tmp)], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        os.environ.update(CAPSNET_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                          CAPSNET_ARTIFACTS=str(self.tmp / "artifacts"), CAPSNET_METRICS_PORT="0",
                          RAY_USAGE_STATS_ENABLED="0")
        os.environ.update(ray_node_env())  # the local Ray started as `capsctl up` and the worker start it
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("CAPSNET_")}})
        self.worker = Worker(Settings.from_env(), num_cpus=num_cpus, poll_seconds=0.5)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.queue = self.worker.queue

    def close(self) -> None:
        import ray

        self.worker.request_stop()
        self.thread.join(timeout=60)
        ray.shutdown()
        self.redis.terminate()
        self.redis.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="capsnet,lenet5")
    parser.add_argument("--ranks", default="1,2", help="rank counts N")
    parser.add_argument("--paths", default="one,ddp,ray,capsctl", help=f"any of {', '.join(PATHS)}")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    parser.add_argument("--steps", type=int, default=0,
                        help=f"steps per epoch (default: {DEFAULT_STEPS}); the train subset is steps x batch")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is timed, the others are warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the table shows medians")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads of each (b) rank")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the local Ray advertises (as the demo)")
    parser.add_argument("--_rank", dest="rank_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_case is not None:
        _spawned_rank(json.loads(args.rank_case))
        return

    shared = [d for d in (REPO.parent / "shared/data", REPO / "shared/data") if (d / "MNIST/raw").is_dir()]
    if not os.environ.get("CAPSNET_DATA_DIR") and shared:
        os.environ["CAPSNET_DATA_DIR"] = str(shared[0])  # as scripts/demo.sh and the tests find it
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    ranks_list = [int(n) for n in args.ranks.split(",")]
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda":
        if not gpus:
            parser.error("--device cuda: no CUDA device")
        if too_many := [n for n in ranks_list if n > gpus]:
            print(f"skipping N = {too_many}: NCCL needs one GPU per rank and there are {gpus}")
            ranks_list = [n for n in ranks_list if n <= gpus]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"device {args.device}{f' ({gpus} GPUs)' if gpus else ''}, global batch {args.batch_size}, "
          f"{args.epochs} epochs (last timed), {args.repeats} round(s)", flush=True)

    service = Service(args.num_cpus, gpus) if {"ray", "capsctl", "ray-nice15"} & set(paths) else None
    figures: dict[tuple[str, int, str], list[float]] = {}
    try:
        for round_ in range(args.repeats):
            for model in args.models.split(","):
                for ranks in ranks_list:
                    for path in paths:
                        case = {"path": path, "model": model, "device": args.device, "seed": 0, "lr": 1e-3,
                                "batch_size": args.batch_size, "epochs": args.epochs,
                                "steps": args.steps or DEFAULT_STEPS.get(model, 20),
                                "threads": ranks * args.threads_per_rank if path == "one" else args.threads_per_rank,
                                "nice": 15 if path == "ray-nice15" else 0}
                        began = time.perf_counter()
                        if path in ("one", "ddp"):
                            out = run_spawned(case, ranks)
                        elif path == "capsctl":
                            out = run_capsctl(case, ranks, service.queue)
                        else:
                            out = run_ray_train(case, ranks, service.tmp / "ray")
                        ips = float(out["images_per_second"])
                        figures.setdefault((model, ranks, path), []).append(ips)
                        print(f"round {round_ + 1}: {model:8} N={ranks} {PATHS[path]:30} {ips:8.1f} img/s "
                              f"(run {time.perf_counter() - began:.0f} s)", flush=True)
    finally:
        if service is not None:
            service.close()

    print(f"\n{'model':8} {'N':>2}  {'path':30} {'train img/s':>11} {'vs (b)':>7}")
    for model in args.models.split(","):
        for ranks in ranks_list:
            base = median(figures.get((model, ranks, "ddp"), [float("nan")]))
            for path in paths:
                ips = median(figures[(model, ranks, path)])
                print(f"{model:8} {ranks:>2}  {PATHS[path]:30} {ips:11.1f} {100 * ips / base:6.0f}%")


if __name__ == "__main__":
    main()
