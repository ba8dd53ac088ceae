"""Benchmark the Redis job queue: submit throughput, claim latency, latency with a deep backlog.

    python benchmarks/bench_queue.py                      # starts a private redis-server
    CAPSNET_REDIS_URL=redis://host:6379/0 python benchmarks/bench_queue.py --prefix bench:

Against an existing Redis it only touches keys under ``--prefix`` (default ``capsbench:``) and
deletes them afterwards; it refuses to start when keys under that prefix already exist.
Goals: pipelined submit >= 5,000 jobs/s from one client; claim p50/p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.queue.connection import redis_client  # noqa: E402
from services.queue.jobqueue import JobQueue  # noqa: E402
from services.queue.keys import Keys  # noqa: E402

SPEC = {"kind": "train", "model": "capsnet", "epochs": 1, "train_subset": 64, "test_subset": 64,
        "model_config": {"conv_channels": 16, "primary_maps": 4}}
CPU = {"gpus": 0, "cpus": 8}


def start_redis() -> tuple[str, subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or set CAPSNET_REDIS_URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc, workdir


def wipe(client, keys: Keys) -> int:
    n = 0
    batch = []
    for key in client.scan_iter(match=keys.all_pattern(), count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch.clear()
    if batch:
        n += client.unlink(*batch)
    return n


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def fill(queue: JobQueue, n: int, batch: int) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        queue.submit_many([SPEC] * k, check_capacity=False)
        done += k
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("CAPSNET_REDIS_URL"),
                    help="default: $CAPSNET_REDIS_URL, else a private redis-server")
    ap.add_argument("--prefix", default="capsbench:")
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs for the throughput run")
    ap.add_argument("--batch", type=int, default=1000, help="jobs per pipeline")
    ap.add_argument("--samples", type=int, default=2000, help="latency samples per operation")
    ap.add_argument("--backlog", type=int, default=100_000, help="queued jobs for the deep-queue run")
    args = ap.parse_args(argv)

    proc = workdir = None
    url = args.redis_url
    if not url:
        url, proc, workdir = start_redis()
    client = redis_client(url)
    keys = Keys(args.prefix)
    rows: list[tuple[str, str, str]] = []
    try:
        if next(client.scan_iter(match=keys.all_pattern(), count=1000), None) is not None:
            sys.exit(f"keys under {args.prefix!r} already exist on {url}; pick another --prefix")
        queue = JobQueue(client, keys, lease_seconds=300)
        info = client.info("server")
        print(f"redis {info.get('redis_version')} at {url.split('@')[-1]}; python {sys.version.split()[0]}")

        # 1. pipelined submit throughput (validation + Lua submit, one client)
        queue.submit_many([SPEC] * 200, check_capacity=False)  # warm up (script load, pydantic)
        wipe(client, keys)
        rate = fill(queue, args.jobs, args.batch)
        rows.append((f"submit_many, {args.batch} per call (jobs/s)", f"{rate:,.0f}", ">= 5,000"))
        single = timed(lambda: queue.submit(SPEC, check_capacity=False), args.samples)
        rows.append(("submit, one round trip p50 / p99 (ms)", f"{pct(single, 50):.2f} / {pct(single, 99):.2f}", ""))

        # 2. claim latency (small queue), plus complete
        tokens = []
        claims = timed(lambda: tokens.append(queue.claim("bench-w", CPU)), args.samples)
        rows.append(("claim p50 / p99 (ms)", f"{pct(claims, 50):.2f} / {pct(claims, 99):.2f}", "<= 5"))
        jobs = iter(tokens)

        def complete():
            job = next(jobs)
            queue.complete(job.id, job.token, {"accuracy": 0.99})

        comp = timed(complete, min(args.samples, len(tokens)))
        rows.append(("complete p50 / p99 (ms)", f"{pct(comp, 50):.2f} / {pct(comp, 99):.2f}", ""))
        wipe(client, keys)

        # 3. with a deep backlog
        t0 = time.perf_counter()
        fill(queue, args.backlog, args.batch)
        fill_s = time.perf_counter() - t0
        depth = sum(queue.queue_depth().values())
        rows.append((f"fill backlog of {depth:,} jobs (s)", f"{fill_s:.1f}", ""))
        sub = timed(lambda: queue.submit(SPEC, check_capacity=False), args.samples)
        rows.append((f"submit @ {depth // 1000}k queued p50 / p99 (ms)", f"{pct(sub, 50):.2f} / {pct(sub, 99):.2f}", ""))
        claimed = []
        cl = timed(lambda: claimed.append(queue.claim("bench-w", CPU)), args.samples)
        rows.append((f"claim @ {depth // 1000}k queued p50 / p99 (ms)", f"{pct(cl, 50):.2f} / {pct(cl, 99):.2f}", "<= 5"))
        ids = iter([j.id for j in claimed] + [r.id for r in queue.list(state="queued", limit=args.samples)])
        gt = timed(lambda: queue.get(next(ids)), args.samples)
        rows.append((f"get @ {depth // 1000}k queued p50 / p99 (ms)", f"{pct(gt, 50):.2f} / {pct(gt, 99):.2f}", ""))
        sc = timed(queue.state_counts, 200)
        rows.append(("state_counts p50 (ms)", f"{statistics.median(sc):.2f}", ""))
        mem = client.info("memory").get("used_memory_human", "?")
        rows.append(("redis used_memory", str(mem), ""))
    finally:
        wipe(client, keys)
        client.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(workdir, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'value':>15}  goal")
    print(f"{'-' * width}  {'-' * 15}  --------")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>15}  {goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
