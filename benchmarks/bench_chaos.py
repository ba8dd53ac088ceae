"""Chaos: real short jobs while workers are SIGKILLed, checkpoints are damaged, the artifact disk
fills up, Redis runs out of memory and an AOF redis-server is killed and restarted.

    python benchmarks/bench_chaos.py [--jobs 12] [--worker-kills 20] [--redis-restarts 3]
                                     [--checkpoint-damage 4] [--disk-fills 2] [--oom-windows 2]
                                     [--workers 2] [--epochs 4] [--train-subset 12000] [--kill-after 20] [--seed 0]

Starts a private redis-server (``appendonly yes``, ``appendfsync always``) and a local Ray in this
process, ``--workers`` real ``capsctl worker`` subprocesses, and submits ``--jobs`` LeNet5 jobs with
``--max-retries 0`` (so any job that fails for an infrastructure loss shows up as failed). While
jobs run, it SIGKILLs a random worker whose attempt has run ``--kill-after`` seconds (and starts
a fresh one) ``--worker-kills`` times, and
SIGKILLs redis-server and restarts it on the same directory and port ``--redis-restarts`` times,
spread over the run. Storage faults, also spread over the run:

* ``--checkpoint-damage``: a running job's newest ``epoch-NNNN/checkpoint.pt`` is truncated to half,
  has bytes flipped in the middle, or its folder is deleted, or Ray's
  ``checkpoint_manager_snapshot.json`` is emptied (in turn), then its worker is SIGKILLed;
* ``--disk-fills``: the artifact store (a private tmpfs of ``--artifacts-mb``, so root is needed)
  is filled to the last byte for ``--fill-seconds``, then freed;
* ``--oom-windows``: redis-server's ``maxmemory`` is set below its used memory (``noeviction``)
  for ``--oom-seconds``, then lifted.

At the end it prints:

    submitted / succeeded / failed / lost (not finished by the deadline)
    completed twice      jobs with more than one ``succeeded`` transition
    resumed              attempts that resumed from a checkpoint
    wasted epochs        epochs trained beyond each job's own epochs, summed
    worst resume gap     per resume: last epoch reported by the dead attempt minus the epoch it
                         resumed after (0 or 1 = "resumed within one epoch of where it died")

Epoch counts come from the jobs' progress events; events published while Redis is down are
dropped by design (the outcome is not), so "wasted epochs" is a lower bound when Redis restarts
land mid-epoch.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.queue.connection import redis_client  # noqa: E402
from services.queue.jobqueue import JobQueue  # noqa: E402
from services.queue.keys import Keys  # noqa: E402
from services.stack.processes import free_port  # noqa: E402

WORKER_CODE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO);"
    "from services.config import Settings; from services.worker.worker import Worker;"
    "Worker(Settings.from_env(), worker_id=sys.argv[1]).run()"
)
ATTEMPT_RE = re.compile(r"attempt (\d+) started")


class RedisServer:
    """A redis-server with AOF on a private directory, killable and restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        client = redis_client(self.url)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except Exception:  # not listening or still LOADING the AOF
                time.sleep(0.05)
        sys.exit("redis-server did not come up within 30 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class RedisHA:
    """A primary and a replica (AOF each) watched by three Sentinels, as ``redis+sentinel://``;
    ``fail_over`` SIGKILLs the current primary, waits for the Sentinels to promote the replica and
    brings the old primary back as the new one's replica (an operator's part, done at once)."""

    SERVICE = "capsnet"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinel_ports)}/{self.SERVICE}/0"

    def _server(self, port: int, *extra: str) -> None:
        folder = self.workdir / str(port)
        folder.mkdir(exist_ok=True)
        binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
        self.procs[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(folder), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_ping(port)

    def primary_port(self) -> int:
        import redis as redis_py

        for port in self.sentinel_ports:
            try:
                return int(redis_py.Redis(port=port, decode_responses=True).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)[1])
            except Exception:  # this Sentinel is busy or not up: ask the next
                continue
        raise RuntimeError("no Sentinel answered")

    def start(self) -> None:
        import redis as redis_py

        self._server(self.ports[0])
        self._server(self.ports[1], "--replicaof", "127.0.0.1", str(self.ports[0]))
        binary = shutil.which("redis-server")
        for n, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{n}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\nlogfile {self.workdir}/sentinel-{n}.log\n"
                            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.ports[0]} 2\n"
                            f"sentinel down-after-milliseconds {self.SERVICE} 3000\n"
                            f"sentinel failover-timeout {self.SERVICE} 6000\n")
            self.sentinels.append(subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
            _wait_for_ping(port)
        deadline = time.monotonic() + 60  # every Sentinel knows the replica and both other Sentinels
        while not all(redis_py.Redis(port=p).execute_command("SENTINEL", "REPLICAS", self.SERVICE)
                      and len(redis_py.Redis(port=p).execute_command("SENTINEL", "SENTINELS", self.SERVICE)) == 2
                      for p in self.sentinel_ports):
            if time.monotonic() > deadline:
                sys.exit("the Sentinels never found the replica and each other")
            time.sleep(0.2)

    def fail_over(self) -> float:
        """Seconds from the SIGKILL of the primary to a promoted replica."""
        old = self.primary_port()
        new = self.ports[1] if old == self.ports[0] else self.ports[0]
        self.procs[old].kill()
        self.procs[old].wait(timeout=10)
        killed = time.monotonic()
        while self.primary_port() != new:
            if time.monotonic() - killed > 120:
                raise RuntimeError("no failover within 120 s")
            time.sleep(0.1)
        took = time.monotonic() - killed
        shutil.rmtree(self.workdir / str(old), ignore_errors=True)  # it comes back empty and resyncs
        self._server(old, "--replicaof", "127.0.0.1", str(new))
        return took

    def kill(self) -> None:
        for proc in [*self.procs.values(), *self.sentinels]:
            if proc.poll() is None:
                proc.kill()

    stop = kill


def _wait_for_ping(port: int) -> None:
    import redis as redis_py

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if redis_py.Redis(port=port).ping():
                return
        except Exception:  # not listening yet, or LOADING
            time.sleep(0.05)
    sys.exit(f"redis-server on {port} did not come up within 30 s")


class WorkerProc:
    def __init__(self, worker_id: str, env: dict[str, str], log_dir: Path) -> None:
        self.worker_id = worker_id
        self.log = open(log_dir / f"{worker_id}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, worker_id], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


DAMAGE_KINDS = ("truncate", "flip", "delete-folder", "empty-snapshot")


def damage_newest_checkpoint(job_dir: Path, kind: str) -> str | None:
    """Damage a job's newest epoch checkpoint on disk as a crash or a full disk would; says what it did."""
    # epoch-NNNN only: a resume moves damaged folders aside as epoch-NNNN.corrupt-<ms>
    epochs = sorted(p for p in job_dir.glob("epoch-[0-9][0-9][0-9][0-9]") if (p / "checkpoint.pt").is_file())
    if not epochs:
        return None
    newest = epochs[-1] / "checkpoint.pt"
    if kind == "truncate":
        size = newest.stat().st_size
        os.truncate(newest, size // 2)
    elif kind == "flip":
        with open(newest, "r+b") as handle:
            handle.seek(newest.stat().st_size // 2)
            chunk = handle.read(64)
            handle.seek(-len(chunk), os.SEEK_CUR)
            handle.write(bytes(b ^ 0xFF for b in chunk))
    elif kind == "delete-folder":
        shutil.rmtree(epochs[-1])
    else:
        snapshot = job_dir / "checkpoint_manager_snapshot.json"
        if not snapshot.is_file():
            return None
        snapshot.write_bytes(b"")
        return f"emptied {snapshot.relative_to(job_dir.parent)}"
    return f"{kind} {newest.relative_to(job_dir.parent)}"


def fill_disk(root: Path) -> Path:
    """Write one file until the file system under `root` has no byte left (ENOSPC)."""
    filler = root / "chaos-filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 20, 4096, 1):  # megabytes, then the last pages, then the last bytes
            try:
                while os.write(fd, b"\0" * block):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def job_figures(queue: JobQueue, job_id: str, epochs: int) -> dict:
    """Attempts, succeeded transitions, resumes and epochs trained, from the record and its events."""
    record = queue.get(job_id)
    succeeded = sum(1 for t in (record.transitions if record else []) if isinstance(t, dict)
                    and t.get("state") == "succeeded")
    attempt, last_epoch, trained, resumes, gaps = 0, {}, 0, 0, []
    for _, event in queue.events.read(job_id, "0", count=100_000):
        data = event["data"] if isinstance(event["data"], dict) else {}
        if event["type"] == "log":
            match = ATTEMPT_RE.search(str(data.get("message", "")))
            if match:
                attempt = int(match.group(1))
            if "resumed_from_epoch" in data and data.get("rank", 0) == 0:
                resumes += 1
                earlier = max((e for a, e in last_epoch.items() if a < attempt), default=None)
                if earlier is not None:
                    gaps.append(earlier - int(data["resumed_from_epoch"]))
        elif event["type"] == "progress" and data.get("type") == "epoch":
            trained += 1
            last_epoch[attempt] = max(last_epoch.get(attempt, 0), int(data.get("epoch", 0)))
    return {"state": record.state if record else "missing", "succeeded_transitions": succeeded,
            "attempts": record.attempt if record else 0, "resumes": resumes, "gaps": gaps,
            "wasted_epochs": max(0, trained - epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-kills", type=int, default=20)
    parser.add_argument("--redis-restarts", type=int, default=3)
    parser.add_argument("--redis-down-seconds", type=float, default=5.0)
    parser.add_argument("--checkpoint-damage", type=int, default=0,
                        help="damage a running job's newest checkpoint, then SIGKILL its worker, this many times")
    parser.add_argument("--disk-fills", type=int, default=0, help="fill the artifact tmpfs this many times")
    parser.add_argument("--fill-seconds", type=float, default=15.0)
    parser.add_argument("--artifacts-mb", type=int, default=512, help="size of the artifact tmpfs (disk fills)")
    parser.add_argument("--oom-windows", type=int, default=0, help="put Redis out of memory this many times")
    parser.add_argument("--oom-seconds", type=float, default=10.0)
    parser.add_argument("--failovers", type=int, default=0,
                        help="run Redis as primary + replica + 3 Sentinels (WAIT 1) and fail the primary over this "
                             "many times (replaces --redis-restarts and --oom-windows)")
    parser.add_argument("--kill-after", type=float, default=20.0,
                        help="only kill a worker whose current attempt has run this long (s)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=12000)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds before unfinished jobs count as lost")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="capsnet-chaos-"))
    (tmp / "redis").mkdir()
    if args.failovers and (args.redis_restarts or args.oom_windows):
        sys.exit("--failovers replaces --redis-restarts and --oom-windows: give those as 0")
    server = RedisHA(tmp / "redis") if args.failovers else RedisServer(tmp / "redis")
    server.start()
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    if args.disk_fills:
        # A real file system that fills up: a private tmpfs (root only).
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.artifacts_mb}m", "tmpfs", str(artifacts)],
                       check=True)
    ray_info = ray.init(num_cpus=2 * args.workers, include_dashboard=False, logging_level="WARNING",
                        configure_logging=False, log_to_driver=False)
    env = dict(os.environ)
    shared = REPO.parent / "shared" / "data"
    if "CAPSNET_DATA_DIR" not in env and shared.is_dir():  # the checkout's MNIST (no download here)
        env["CAPSNET_DATA_DIR"] = str(shared.resolve())
    env.update({"CAPSNET_REDIS_URL": server.url, "RAY_ADDRESS": ray_info.address_info["gcs_address"],
                "CAPSNET_ARTIFACTS": str(artifacts), "CAPSNET_METRICS_PORT": "0",
                "CAPSNET_LEASE_SECONDS": "6", "CAPSNET_HEARTBEAT_SECONDS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                # the store counts as full below 16 MiB free: fits the small tmpfs of --disk-fills
                "CAPSNET_ARTIFACTS_MIN_FREE_BYTES": str(16 << 20),
                **({"CAPSNET_REDIS_WAIT": "1", "CAPSNET_REDIS_WAIT_TIMEOUT": "1000"} if args.failovers else {}),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    queue = JobQueue(redis_client(server.url), Keys("capsnet:"), lease_seconds=6,
                     wait_replicas=1 if args.failovers else 0)
    # max_retries 0: a job failing for a lost worker would show. max_lost above the number of kills:
    # a job that absorbs every kill must still resume (the budget itself is tested elsewhere).
    spec = {"kind": "train", "model": "lenet5", "epochs": args.epochs, "train_subset": args.train_subset,
            "test_subset": 1000, "eval_angles": [0, 35], "max_retries": 0,
            "max_lost": min(100, args.worker_kills + args.checkpoint_damage + args.disk_fills + 5)}
    job_ids = [queue.submit({**spec, "seed": i}, check_capacity=False).id for i in range(args.jobs)]
    print(f"submitted {len(job_ids)} jobs; workers {args.workers}; plan: {args.worker_kills} worker kills, "
          f"{args.checkpoint_damage} checkpoint damages, {args.disk_fills} disk fills, {args.oom_windows} OOM windows, "
          f"{args.redis_restarts} redis restarts, {args.failovers} Sentinel failovers; logs in {tmp}", flush=True)

    serial = 0
    workers: list[WorkerProc] = []

    def leave_nothing_behind() -> None:  # also when this script dies: no orphan workers, no mount left
        for w in workers:
            if w.alive():
                os.killpg(w.proc.pid, signal.SIGKILL)
        server.kill()
        if args.disk_fills:
            subprocess.run(["umount", "-l", str(artifacts)], check=False, stderr=subprocess.DEVNULL)

    atexit.register(leave_nothing_behind)

    def spawn() -> None:
        nonlocal serial
        serial += 1
        workers.append(WorkerProc(f"chaos-{serial}", env, tmp))

    for _ in range(args.workers):
        spawn()

    def unfinished() -> list[str]:
        while True:
            try:
                return [j for j in job_ids if (r := queue.get(j)) is None or not r.is_terminal]
            except Exception:  # Redis is down right now: ask again shortly
                time.sleep(0.5)

    # Every fault once, shuffled: spread over the run, one every few seconds.
    faults = (["kill"] * args.worker_kills + ["redis"] * args.redis_restarts + ["damage"] * args.checkpoint_damage
              + ["fill"] * args.disk_fills + ["oom"] * args.oom_windows + ["failover"] * args.failovers)
    rng.shuffle(faults)
    done: dict[str, int] = {name: 0 for name in ("kill", "redis", "damage", "fill", "oom", "failover")}
    failover_seconds: list[float] = []
    exited_alone = 0
    started = time.monotonic()

    def stamp() -> str:
        return f"[{time.monotonic() - started:6.1f}s]"

    def busy_workers() -> list[tuple[WorkerProc, str]]:
        """Workers training a job whose attempt has run ``--kill-after`` seconds, with that job."""
        busy = []
        for w in workers:
            if not w.alive():
                continue
            try:
                info = json.loads(queue.client.get(queue.keys.worker(w.worker_id)) or "{}")
                record = queue.get(info["current_job"]) if info.get("current_job") else None
            except Exception:  # Redis is down or out of memory right now
                record = None
            if record is not None and record.started_at and time.time() - record.started_at > args.kill_after:
                busy.append((w, record.id))
        return busy

    def kill_worker(victim: WorkerProc) -> None:
        victim.kill()
        workers.remove(victim)
        spawn()

    while (left := unfinished()) and time.monotonic() - started < args.deadline:
        time.sleep(rng.uniform(4.0, 9.0))
        if faults:
            fault = faults[0]
            if fault in ("kill", "damage"):
                busy = busy_workers()
                if fault == "damage":  # only jobs that have a checkpoint to damage
                    busy = [(w, j) for w, j in busy if any((artifacts / j).glob("epoch-[0-9][0-9][0-9][0-9]/checkpoint.pt"))]
                if busy:  # an idle kill tests nothing: wait for a busy worker
                    victim, job_id = rng.choice(busy)
                    what = ""
                    if fault == "damage":
                        kind = DAMAGE_KINDS[done["damage"] % len(DAMAGE_KINDS)]
                        what = (damage_newest_checkpoint(artifacts / job_id, kind) or "nothing to damage") + ", then "
                    kill_worker(victim)
                    faults.pop(0)
                    done[fault] += 1
                    print(f"{stamp()} {what}SIGKILL worker {victim.worker_id} (job {job_id}); "
                          f"{len(left)} jobs unfinished", flush=True)
            elif fault == "redis":
                faults.pop(0)
                server.kill()
                done["redis"] += 1
                print(f"{stamp()} SIGKILL redis-server, down {args.redis_down_seconds:.0f} s", flush=True)
                time.sleep(args.redis_down_seconds)
                server.start()
            elif fault == "failover":
                faults.pop(0)
                done["failover"] += 1
                print(f"{stamp()} SIGKILL the Redis primary (Sentinels fail over)", flush=True)
                failover_seconds.append(server.fail_over())
                print(f"{stamp()} replica promoted after {failover_seconds[-1]:.1f} s; old primary back as its replica",
                      flush=True)
            elif fault == "fill":
                faults.pop(0)
                done["fill"] += 1
                filler = fill_disk(artifacts)
                print(f"{stamp()} artifact store full ({filler.stat().st_size >> 20} MiB filler) for "
                      f"{args.fill_seconds:.0f} s", flush=True)
                time.sleep(args.fill_seconds)
                filler.unlink()
            elif fault == "oom":
                faults.pop(0)
                done["oom"] += 1
                control = redis_client(server.url)
                used = int(control.info("memory")["used_memory"])
                control.config_set("maxmemory-policy", "noeviction")
                control.config_set("maxmemory", str(max(1 << 20, used // 2)))
                print(f"{stamp()} Redis out of memory (maxmemory {max(1 << 20, used // 2)} B < used {used} B) for "
                      f"{args.oom_seconds:.0f} s", flush=True)
                time.sleep(args.oom_seconds)
                control.config_set("maxmemory", "0")
        # a worker that died on its own (it should not) is replaced, and counted
        for w in list(workers):
            if not w.alive():
                print(f"worker {w.worker_id} exited by itself (rc {w.proc.returncode})", flush=True)
                exited_alone += 1
                workers.remove(w)
                spawn()
    elapsed = time.monotonic() - started

    figures = {j: job_figures(queue, j, args.epochs) for j in job_ids}
    for w in workers:
        w.stop()
    gaps = [g for f in figures.values() for g in f["gaps"]]
    states = [f["state"] for f in figures.values()]
    rows = [
        ("jobs submitted", len(job_ids)),
        ("succeeded", states.count("succeeded")),
        ("failed", states.count("failed")),
        ("lost (unfinished after the deadline)", sum(1 for s in states if s not in ("succeeded", "failed", "cancelled"))),
        ("completed twice", sum(1 for f in figures.values() if f["succeeded_transitions"] > 1)),
        ("worker SIGKILLs / redis restarts", f"{done['kill']} / {done['redis']}"),
        ("checkpoints damaged (+ SIGKILL)", done["damage"]),
        ("disk fills / Redis OOM windows", f"{done['fill']} / {done['oom']}"),
        ("Sentinel failovers (WAIT 1)", f"{done['failover']}" + (f", promoted after {min(failover_seconds):.1f}-"
                                                                 f"{max(failover_seconds):.1f} s" if failover_seconds else "")),
        ("workers that exited on their own", exited_alone),
        ("attempts beyond the first", sum(max(0, f["attempts"] - 1) for f in figures.values())),
        ("resumed from a checkpoint", sum(f["resumes"] for f in figures.values())),
        ("wasted epochs (lower bound)", sum(f["wasted_epochs"] for f in figures.values())),
        ("worst resume gap (epochs)", max(gaps) if gaps else "-"),
        ("wall time", f"{elapsed:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'measure'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|-------:|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    ray.shutdown()
    server.stop()
    if args.disk_fills:
        subprocess.run(["umount", str(artifacts)], check=False)
    failed = [j for j, f in figures.items() if f["state"] != "succeeded" or f["succeeded_transitions"] != 1]
    if failed:
        print(f"not clean: {', '.join(failed)} (logs in {tmp})")
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
