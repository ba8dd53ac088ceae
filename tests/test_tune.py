"""Tune jobs end to end: a real Redis, a local Ray cluster, `capsctl worker` subprocesses running
Ray Tune sweeps of tiny models on real MNIST subsets. Nothing here is mocked."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import pytest

from services.queue.jobqueue import JobQueue
from services.results.tune_matrix import build_matrix
from services.spec.jobspec import parse_spec
from services.spec.tune_space import expand_trials

from .service_helpers import wait_until

TINY = {"capsnet": {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": [32, 64]}}
SWEEP = {"kind": "tune", "models": ["lenet5", "capsnet"], "angles": [0, 45], "eval_angles": [0, 45],
         "epochs": 2, "train_subset": 3000, "val_split": 500, "test_subset": 500, "batch_size": 64, "lr": [2e-3], "asha": False,
         "max_concurrent": 2, "model_config": TINY}


def _trial_events(queue: JobQueue, job_id: str) -> list[dict]:
    return [e["data"] for _, e in queue.events.read(job_id, count=10_000)
            if e["type"] == "progress" and e["data"].get("type") == "trial"]


def _check_matrix(result: dict, models: list[str]) -> None:
    assert result["kind"] == "tune" and result["eval_angles"] == ["0", "45"]
    for model in models:
        m = result["models"][model]
        assert m["rows"] == ["shift2", "shift2+rot45"] and m["cols"] == ["0", "45"]
        for i in range(2):
            for j in range(2):
                assert math.isfinite(m["mean"][i][j]) and 0.0 <= m["mean"][i][j] <= 1.0
                assert m["n"][i][j] == 1
        for j, col in enumerate(m["cols"]):  # best per column is the row with the highest mean
            assert m["best_by_col"][col] == max(m["rows"], key=lambda r: m["mean"][m["rows"].index(r)][j])


# ----------------------------------------------------------------------------- unit: the search space


def test_expand_trials_grid_seeds_and_sampled_lr() -> None:
    spec = parse_spec({"kind": "tune", "models": ["capsnet", "lenet5"], "angles": [0, 15], "lr": [1e-3, 3e-4],
                       "routing_iters": [1, 3], "seeds": 2})
    trials = expand_trials(spec)
    assert len(trials) == spec.num_trials() == 2 * 2 * 2 * 2 + 2 * 2 * 2
    assert len({t["key"] for t in trials}) == len(trials)
    assert {t["routing_iters"] for t in trials if t["model"] == "capsnet"} == {1, 3}
    assert {t["routing_iters"] for t in trials if t["model"] == "lenet5"} == {None}
    assert {t["augment"] for t in trials} == {"shift2", "shift2+rot15"}
    sampled = expand_trials(parse_spec({"kind": "tune", "models": ["lenet5"], "angles": [0], "samples": 3}))
    lrs = [t["lr"] for t in sampled]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 3e-3 for lr in lrs)
    assert expand_trials(parse_spec({"kind": "tune", "models": ["lenet5"], "angles": [0], "samples": 3})) == sampled


def test_matrix_selects_config_and_best_trial_by_val_accuracy_not_by_the_cells() -> None:
    spec = parse_spec({"kind": "tune", "models": ["lenet5"], "angles": [0], "eval_angles": [0, 30],
                       "lr": [1e-3, 1e-2], "seeds": 2})
    finals = []
    for t in expand_trials(spec):
        good = t["lr"] == 1e-3
        # The test figures alone would pick lr 1e-2 for the 30° column and seed 0 as the best
        # trial; the validation split says lr 1e-3, seed 1.
        acc = {"0": 0.92 - 0.01 * t["seed"] if good else 0.5, "30": 0.6 if good else 0.7}
        finals.append({**t, "status": "finished", "val_accuracy": 0.8 + 0.01 * t["seed"] if good else 0.7,
                       "rotation_accuracy": acc, "epochs_trained": 10, "checkpoint": f"/ckpt/{t['key']}"})
    m = build_matrix(spec, finals)["lenet5"]
    assert m["selected"][0]["lr"] == 1e-3 and m["n"] == [[2, 2]]
    assert m["mean"][0][0] == pytest.approx(0.915) and m["std"][0][0] == pytest.approx(0.00707, abs=1e-4)
    assert m["mean"][0][1] == pytest.approx(0.6)  # not the 0.7 of the worse config
    # The best trial: the highest val accuracy (lr 1e-3, seed 1), reported with its test figures.
    assert (m["best_trial"]["lr"], m["best_trial"]["seed"]) == (1e-3, 1)
    assert m["best_trial"]["val_accuracy"] == pytest.approx(0.81)
    assert m["best_trial"]["accuracy"] == pytest.approx(0.755)
    assert m["best_checkpoint"] == f"/ckpt/{m['best_trial']['trial']}"
    assert m["best_by_col"] == {"0": "shift2", "30": "shift2"}


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sweep_through_a_worker_gives_a_plausible_complete_matrix(queue: JobQueue, workers) -> None:
    from capsnet_core.checkpoint import load_model
    from services.runs.evaluate import _eval_task
    from services.spec.jobspec import EvalSpec

    job = queue.submit({**SWEEP, "name": "tune-e2e"})
    worker = workers("w-tune")
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                        what=f"the sweep to finish; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    result = record.result
    _check_matrix(result, ["lenet5", "capsnet"])
    lenet = result["models"]["lenet5"]
    shift, rot = lenet["rows"].index("shift2"), lenet["rows"].index("shift2+rot45")
    assert lenet["mean"][shift][1] < lenet["mean"][shift][0]  # upright training: worse on 45° digits
    assert lenet["mean"][rot][1] > lenet["mean"][shift][1]  # training with rotations helps at 45°
    assert lenet["best_by_col"]["45"] == "shift2+rot45"
    assert len(result["trials"]) == 4 and all(t["status"] == "finished" for t in result["trials"])
    assert result["validation"]["size"] == 500 and sum(result["validation"]["class_counts"]) == 500
    # Artifacts: CSV (a row per cell), JSON and a heatmap per model.
    rows = list(csv.DictReader(open(result["artifacts"]["csv"])))
    assert len(rows) == 8 and {r["model"] for r in rows} == {"lenet5", "capsnet"}
    assert Path(result["artifacts"]["json"]).is_file()
    for model in ("lenet5", "capsnet"):
        assert Path(result["artifacts"]["heatmaps"][model]).read_bytes()[:4] == b"\x89PNG"
        best = result["models"][model]["best_checkpoint"]
        assert load_model(best).name == model
        # `capsctl eval <best checkpoint>` runs this task: it measures what the sweep reported.
        spec = EvalSpec(source=best, angles=[0, 45], test_subset=500)
        evaluated = _eval_task(spec.to_dict(), best, None)["rotation_accuracy"]
        reported = result["models"][model]["best_trial"]["rotation_accuracy"]
        assert evaluated == pytest.approx(reported, abs=0.005)
    # Progress: per-trial events (epochs and ends) and the job's trial counter.
    events = _trial_events(queue, job.id)
    assert Counter(e["trial"] for e in events if e["status"] == "finished") == {
        t["key"]: 1 for t in result["trials"]}
    assert any(e["status"] == "running" and e.get("val_accuracy") is not None for e in events)
    assert record.progress["trials"] == 4 and record.progress["trials_done"] == 4


@pytest.mark.slow
def test_cancel_mid_sweep_stops_trials_and_frees_ray(queue: JobQueue, workers) -> None:
    import ray

    job = queue.submit({**SWEEP, "epochs": 200, "train_subset": 20000, "models": ["lenet5"], "model_config": {}})
    worker = workers("w-tune-cancel")
    wait_until(lambda: any(e["status"] == "running" for e in _trial_events(queue, job.id)), 180,
               what=f"a trial epoch; log:\n{worker.output()[-3000:]}")
    assert ray.available_resources().get("CPU", 0) <= 2  # two trials hold a CPU each
    queue.cancel(job.id)
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 30,
                        what=f"the sweep to stop; log:\n{worker.output()[-3000:]}")
    assert record.state == "cancelled"
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 4, 30, what="Ray to free the trials' CPUs")


@pytest.mark.slow
def test_killed_worker_sweep_resumes_without_rerunning_finished_trials(queue: JobQueue, workers) -> None:
    job = queue.submit({**SWEEP, "epochs": 3, "train_subset": 2000, "max_retries": 2})
    first = workers("w-tune-doomed")

    def finished_and_mid_training() -> bool:
        events = _trial_events(queue, job.id)
        done = {e["trial"] for e in events if e["status"] == "finished"}
        # a CapsNet trial mid-training: its epochs take a while, so it is still training at the kill
        return bool(done) and any(e["status"] == "running" and e["model"] == "capsnet" and e["trial"] not in done
                                  for e in events)

    wait_until(finished_and_mid_training, 240, interval=0.1,
               what=f"one finished trial and one mid-training; log:\n{first.output()[-3000:]}")
    first.kill()
    before = queue.events.read(job.id, count=10_000)
    killed_at = len(before)
    before_trials = [e["data"] for _, e in before if e["type"] == "progress" and e["data"].get("type") == "trial"]
    done_before = {e["trial"] for e in before_trials if e["status"] == "finished"}
    busy_before = {e["trial"]: e["epoch"] for e in before_trials
                   if e["status"] == "running" and e["trial"] not in done_before}
    assert done_before and busy_before

    second = workers("w-tune-rescuer")
    record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 300,
                        what=f"the sweep to finish elsewhere; log:\n{second.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    assert record.attempt == 2 and record.worker == "w-tune-rescuer"
    _check_matrix(record.result, ["lenet5", "capsnet"])
    keys = {t["key"] for t in record.result["trials"]}
    events = _trial_events(queue, job.id)
    after = [e["data"] for _, e in queue.events.read(job.id, count=10_000)[killed_at:]
             if e["type"] == "progress" and e["data"].get("type") == "trial"]
    # No trial was trained to the end twice; every one ended (trained, or its earlier result restored).
    finished = Counter(e["trial"] for e in events if e["status"] == "finished")
    assert set(finished) <= keys and max(finished.values()) == 1
    assert {e["trial"] for e in events if e["status"] in ("finished", "restored")} == keys
    # The trials finished before the kill trained no epoch in the second attempt.
    assert not [e for e in after if e["trial"] in done_before and e["status"] in ("running", "finished")]
    # A trial that was mid-training continued after its last reported epoch, not from scratch.
    resumed = {e["trial"]: e["resumed_from_epoch"] for e in after if e["status"] == "resumed"}
    assert any(resumed.get(k, 0) >= epoch for k, epoch in busy_before.items()), (resumed, busy_before)
    logs = [e["data"]["message"] for _, e in queue.events.read(job.id, count=10_000) if e["type"] == "log"]
    assert any("restoring the Tune experiment" in m for m in logs), logs
