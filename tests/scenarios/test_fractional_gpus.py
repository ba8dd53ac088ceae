"""Fractional GPUs: trials and single-rank jobs that share a GPU (``--gpus-per-trial 0.5``).

The fast tests run the spec rules, the queue's claim script and the submit-time capacity check
against a real Redis. The slow test declares 2 GPUs to a real local Ray node on this machine
(which has none), runs a real ``capsctl worker`` and a real tune job packing 4 trials on them,
and reads how many ran at once from the job's own events: the scheduling and admission maths,
with the trials training on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from services.cli import main
from services.config import ray_node_env
from services.queue.jobqueue import JobQueue
from services.spec.errors import SpecError
from services.spec.jobspec import parse_spec
from services.stack.processes import free_port, log_tail, spawn, stop_ray_session

from ..service_helpers import WorkerProcess, service_env, wait_until

LENET = {"kind": "train", "model": "lenet5", "epochs": 1, "train_subset": 300, "test_subset": 200}


def _cli(redis_url: str, tmp_path: Path, *args: str) -> Any:
    env = {"CAPSNET_REDIS_URL": redis_url, "CAPSNET_STATE_DIR": str(tmp_path / "state"),
           "CAPSNET_ARTIFACTS": str(tmp_path / "artifacts")}
    return CliRunner().invoke(main, list(args), env=env)


# ----------------------------------------------------------------------------- spec rules


def test_fractions_are_counted_in_milli_gpus_and_ddp_keeps_whole_gpus() -> None:
    tune = {"kind": "tune", "models": ["lenet5"], "angles": [0]}
    # 3 x 0.1 is 0.30000000000000004 in floats: the demand is kept to milli-GPUs
    assert parse_spec({**tune, "seeds": 3, "gpus_per_trial": 0.1, "max_concurrent": 3}).resources() == {
        "gpus": 0.3, "cpus": 3}
    assert parse_spec({**tune, "seeds": 8, "gpus_per_trial": 0.125, "max_concurrent": 8}).resources() == {
        "gpus": 1, "cpus": 8}
    assert parse_spec({**tune, "gpus_per_trial": 2.0}).gpus_per_trial == 2  # a whole amount stays an int
    half = parse_spec({**LENET, "gpus": 0.5})
    assert (half.ranks, half.resources()) == (1, {"gpus": 0.5, "cpus": 1})
    assert json.loads(half.to_json())["gpus"] == 0.5
    with pytest.raises(SpecError, match=r"^gpus: more than one GPU means one data-parallel rank per whole GPU; "
                                        r"use an integer, or a fraction below 1 \(got 1.5\)$"):
        parse_spec({**LENET, "gpus": 1.5})
    with pytest.raises(SpecError, match=r"^gpus_per_trial: must be an integer in 0..8 or a fraction in \(0, 1\); "
                                        r"fractions in steps of 1/1000 \(got 0.0001\)$"):
        parse_spec({**tune, "gpus_per_trial": 0.0001})


# ----------------------------------------------------------------------------- queue and capacity


def test_claim_fits_fractions_of_what_is_free(queue: JobQueue) -> None:
    half = queue.submit({**LENET, "gpus": 0.5})
    quarter = queue.submit({**LENET, "gpus": 0.25, "name": "quarter"})
    assert (half.gpus, queue.get(half.id).gpus) == (0.5, 0.5)
    assert set(queue.client.smembers(queue.keys.shapes("normal"))) == {"0.5:1", "0.25:1"}
    assert queue.claim("w-1", {"gpus": 0.2, "cpus": 4}) is None  # neither fits in 0.2 GPU
    # Ray's free count is a float sum of fractions: 0.49999999 still holds a 0.5 job (the older one)
    first = queue.claim("w-1", {"gpus": 0.49999999, "cpus": 4})
    assert first is not None and first.job_id == half.id and first.record.gpus == 0.5
    second = queue.claim("w-1", {"gpus": 0.25, "cpus": 4})
    assert second is not None and second.job_id == quarter.id


def test_submit_capacity_counts_fractions_and_refuses_more_whole_gpus_than_a_worker_has(
        queue: JobQueue, redis_url: str, tmp_path: Path) -> None:
    queue.register_worker("w-gpu", {"resources": {"gpus": 2.0, "cpus": 4.0}})
    packed = _cli(redis_url, tmp_path, "tune", "--models", "lenet5", "--angles", "0", "--seeds", "4",
                  "--gpus-per-trial", "0.5", "--max-concurrent", "4")
    assert packed.exit_code == 0, packed.output
    assert queue.get(packed.output.strip().splitlines()[-1]).gpus == 2
    too_many = _cli(redis_url, tmp_path, "submit", "lenet5", "--gpus", "3", "--batch-size", "96")
    assert too_many.exit_code == 2
    assert too_many.output.splitlines() == [
        "Error: gpus: job needs 3 GPU(s) and 3 CPU rank(s) but no live worker offers that "
        "(largest: 2 GPUs, 4 CPUs; cluster total 2 GPUs on 1 worker(s))"]
    over = _cli(redis_url, tmp_path, "tune", "--models", "lenet5", "--angles", "0", "--seeds", "4",
                "--gpus-per-trial", "0.75", "--max-concurrent", "4")
    assert over.exit_code == 2 and over.output.startswith("Error: gpus: job needs 3 GPU(s) and 4 CPU rank(s)")
    assert over.output.rstrip().endswith("; lower gpus_per_trial or max_concurrent")


# ----------------------------------------------------------------------------- a Ray node with 2 declared GPUs


@pytest.fixture
def ray_with_two_gpus(tmp_path: Path) -> Iterator[str]:
    """``ray start --head --num-gpus 2 --num-cpus 4`` on free ports: GPUs this machine lacks,
    which Ray schedules by all the same. Its own node, so the session's CPU-only cluster is untouched."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=2", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}"]
    # `ray start` turns token auth on by default; this private test node runs without, like ray.init's
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **ray_node_env(), "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "ray-start.log"
    proc = spawn(cmd, log, env)
    try:
        assert proc.wait(timeout=120) == 0, log_tail(log, 40)
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_session(proc.pid, grace=15)
        shutil.rmtree(temp_dir, ignore_errors=True)


_SAMPLER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
seen = []
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    free = ray.available_resources().get("GPU", 0.0)
    if not seen or seen[-1] != free:
        seen.append(free)
        print(json.dumps(seen), flush=True)
    time.sleep(0.1)
"""


def _most_at_once(events: list[dict[str, Any]]) -> int:
    running, most = set(), 0
    for e in events:
        if e["status"] == "started":
            running.add(e["trial"])
        elif e["status"] in ("finished", "early_stopped", "error", "restored"):
            running.discard(e["trial"])
        most = max(most, len(running))
    return most


@pytest.mark.slow
def test_half_gpu_trials_pack_four_at_once_on_two_declared_gpus(
        queue: JobQueue, redis_url: str, ray_with_two_gpus: str, tmp_path: Path) -> None:
    # The node runs without token auth; a session Ray started earlier in this process has set
    # RAY_AUTH_MODE=token in os.environ, and a driver in token mode loses its trial actors there.
    env = service_env(redis_url, ray_with_two_gpus, tmp_path / "artifacts", RAY_AUTH_MODE="disabled")
    worker = WorkerProcess("w-frac", env, tmp_path / "w-frac.log")
    sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, ray_with_two_gpus, "150"],
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: queue.cluster_capacity()["max_gpus"] == 2, 90,
                   what=f"the worker to register 2 GPUs; log:\n{worker.output()[-2000:]}")
        submitted = _cli(redis_url, tmp_path, "tune", "--models", "lenet5", "--angles", "0", "--seeds", "4",
                         "--gpus-per-trial", "0.5", "--max-concurrent", "4", "--epochs", "1",
                         "--train-subset", "300", "--val-split", "100", "--test-subset", "200",
                         "--batch-size", "64", "--no-asha")
        assert submitted.exit_code == 0, submitted.output  # 0.5 x 4 = 2 GPUs: fits the 2-GPU worker
        job_id = submitted.output.strip().splitlines()[-1]
        record = wait_until(lambda: (r := queue.get(job_id)) and r.is_terminal and r, 240,
                            what=f"the sweep to finish; worker log:\n{worker.output()[-3000:]}")
    finally:
        worker.stop()
        sampler.terminate()
        free_seen = json.loads((sampler.communicate(timeout=30)[0].strip().splitlines() or ["[]"])[-1])
    assert record.state == "succeeded", (record.error, record.traceback)
    assert record.gpus == 2 and record.spec["gpus_per_trial"] == 0.5
    trials = record.result["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" and t["device"] == "cpu" for t in trials)
    events = [e["data"] for _, e in queue.events.read(job_id, count=10_000)]
    trial_events = [e for e in events if e.get("type") == "trial"]
    # Whole GPUs would allow 2 at once on 2 GPUs; half GPUs allow all 4 (and never more).
    assert 3 <= _most_at_once(trial_events) <= 4, trial_events
    # Ray reserved half a GPU per trial: its free count stepped through halves.
    assert any(g % 1 == 0.5 for g in free_seen) and min(free_seen) >= 0, free_seen
    admitted = [e.get("message", "") for e in events if "reserved in Ray" in e.get("message", "")]
    assert any("(2 GPU(s), 4 CPU(s))" in m for m in admitted), events
