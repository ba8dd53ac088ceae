"""Service latency on a warm local Ray: submit -> claimed -> first training step -> done.

    python benchmarks/bench_service.py [--repeats 3] [--cpu-ranks 1,2]

Starts a private redis-server and a local Ray, runs a Worker in this process, then submits small
LeNet5 jobs one after another. "First step" is when rank 0 reports it is about to train (its
dataset loaded and on the device, the process group up): the moment the first batch starts.

For scale, it also times Ray Train alone on the same Ray: a ``TorchTrainer`` with the same
scaling config and an empty training function, from ``fit()`` to the function's first line.
Most of a job's start-up is that: Ray Train V2 starts a controller actor and one actor per
rank, each a fresh Python process that imports torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

from services.config import Settings
from services.stack.processes import free_port
from services.worker.worker import Worker


def _mark_start(config: dict) -> None:
    Path(config["marker"]).write_text(repr(time.time()))


def bare_ray_train_startup(ranks: int, storage: Path, run: str) -> float:
    """Seconds from TorchTrainer.fit() to the first line of an empty training function."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = storage / f"{run}.started"
    trainer = TorchTrainer(_mark_start, train_loop_config={"marker": str(marker)},
                           scaling_config=ScalingConfig(num_workers=ranks, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=run, storage_path=str(storage),
                                                failure_config=FailureConfig(max_failures=0)))
    t0 = time.time()
    trainer.fit()
    return float(marker.read_text()) - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-ranks", default="1,2", help="CPU rank counts to measure")
    parser.add_argument("--num-cpus", type=int, default=4)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capsctl-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                                   "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    os.environ.update(CAPSNET_REDIS_URL=f"redis://127.0.0.1:{port}/0", CAPSNET_ARTIFACTS=str(tmp / "artifacts"),
                      CAPSNET_METRICS_PORT="0", RAY_USAGE_STATS_ENABLED="0")
    worker = Worker(Settings.from_env(), num_cpus=args.num_cpus, poll_seconds=0.5)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    queue = worker.queue
    rows = []
    bare: dict[int, list[float]] = {}
    try:
        for ranks in [int(x) for x in args.cpu_ranks.split(",")]:
            for repeat in range(args.repeats + 1):  # the first run warms Ray up and is not counted
                t0 = time.time()
                job = queue.submit({"kind": "train", "model": "lenet5", "cpu_ranks": ranks, "epochs": 1,
                                    "batch_size": 64, "train_subset": 2000, "test_subset": 500, "eval_angles": [0]})
                while (record := queue.get(job.id)) is None or not record.is_terminal:
                    time.sleep(0.05)
                events = [e for _, e in queue.events.read(job.id)]
                claimed = next(e["at"] for e in events if e["type"] == "state" and e["data"]["state"] == "running")
                first_step = min(e["at"] for e in events if e["type"] == "log" and e["data"].get("rank") == 0
                                 and "shard_fingerprint" in e["data"])
                if repeat:
                    rows.append((ranks, claimed - t0, first_step - t0, record.finished_at - t0, record.state))
                    bare.setdefault(ranks, []).append(
                        bare_ray_train_startup(ranks, tmp / "bare", f"bare-{ranks}-{repeat}"))
    finally:
        worker.request_stop()
        thread.join(timeout=30)
        redis_proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'ranks':>5} {'submit->claim (ms)':>19} {'submit->first step (s)':>23} {'submit->done (s)':>17}  state")
    for ranks, claim, first, done, state in rows:
        print(f"{ranks:>5} {1000 * claim:>19.1f} {first:>23.2f} {done:>17.2f}  {state}")
    for ranks in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == ranks]
        print(f"median, {ranks} rank(s): claim {1000 * median(r[1] for r in sel):.1f} ms, first step "
              f"{median(r[2] for r in sel):.2f} s, done {median(r[3] for r in sel):.2f} s; "
              f"Ray Train alone (empty TorchTrainer, fit -> function start): {median(bare[ranks]):.2f} s")


if __name__ == "__main__":
    main()
