"""The new models and test suites through the service: a real Redis, a local Ray cluster and
`capsctl worker` processes. A 2-rank Ray Train (gloo DDP) job of the e2cnn model with both suites,
an eval job of its checkpoint, a tune sweep over the three new models, and `capsctl tune` over all five."""

from __future__ import annotations

import json
import urllib.request

import pytest
from click.testing import CliRunner

from capsnet_core.suites import ROTATION_SUITE_ANGLES
from services.cli import main
from services.queue.jobqueue import JobQueue

from ..service_helpers import wait_until

pytestmark = pytest.mark.slow

TINY = {"effcaps": {"width": 4, "primary_dim": 4}, "resnet": {"width": 8}, "c8cnn": {"width": 2, "hidden": 16}}
SUITE_KEYS = {f"{a:g}" for a in ROTATION_SUITE_ANGLES}


def _finish(queue: JobQueue, job_id: str, worker, timeout: float = 600):
    record = wait_until(lambda: (r := queue.get(job_id)) and r.is_terminal and r, timeout,
                        what=f"job {job_id} to finish; worker log:\n{worker.output()[-3000:]}")
    assert record.state == "succeeded", (record.error, record.traceback)
    return record


def test_c8cnn_trains_with_ddp_and_both_suites_then_evaluates(queue: JobQueue, workers, redis_url: str) -> None:
    worker = workers("w-zoo")
    job = queue.submit({"kind": "train", "model": "c8cnn", "cpu_ranks": 2, "epochs": 1, "batch_size": 50,
                        "train_subset": 1000, "test_subset": 300, "lr": 3e-3, "eval_angles": [0],
                        "eval_suites": ["rotation", "affine"], "model_config": TINY["c8cnn"]})
    result = _finish(queue, job.id, worker).result
    assert result["world_size"] == 2
    assert SUITE_KEYS <= set(result["rotation_accuracy"])
    suites = result["suite_accuracy"]
    assert set(suites) == {"rotation_auc", "affine-mnist"} and 0 < suites["rotation_auc"] <= 1
    # Exactly invariant to quarter turns: the same accuracy at 0 and 90 degrees (bilinear rotation
    # by 90 degrees lands on the pixel grid up to float rounding).
    assert abs(result["rotation_accuracy"]["0"] - result["rotation_accuracy"]["90"]) <= 1 / 300
    text = CliRunner().invoke(main, ["--redis-url", redis_url, "results", job.id]).output
    assert "rotation AUC 0-180°" in text and "affine-MNIST accuracy (generated, seed 0)" in text

    evaluation = queue.submit({"kind": "eval", "source": job.id, "angles": [0], "eval_suites": ["rotation"],
                               "test_subset": 300})
    measured = _finish(queue, evaluation.id, worker).result
    assert measured["model"] == "c8cnn"
    assert measured["suite_accuracy"]["rotation_auc"] == pytest.approx(suites["rotation_auc"], abs=1e-6)
    # The eval job's accuracies are on the worker's /metrics too, per angle and per suite (they
    # linger 30 s after the job), and in its event stream for `logs -f`.
    [info] = [w for w in queue.workers() if w.get("id") == "w-zoo"]
    exposed = urllib.request.urlopen(info["metrics_url"], timeout=10).read().decode()
    assert f'capsnet_test_accuracy_ratio{{angle="0",job_id="{evaluation.id}",model="c8cnn"}}' in exposed
    assert f'capsnet_suite_accuracy_ratio{{job_id="{evaluation.id}",model="c8cnn",suite="rotation_auc"}}' in exposed
    evals = [e["data"] for _, e in queue.events.read(evaluation.id, "0", count=1000)
             if e["type"] == "progress" and e["data"].get("type") == "eval"]
    assert evals and evals[-1]["test_accuracy"] == measured["rotation_accuracy"]


def test_tune_compares_the_new_models_with_suite_columns(queue: JobQueue, workers, redis_url: str) -> None:
    worker = workers("w-zoo-tune")
    job = queue.submit({"kind": "tune", "models": ["effcaps", "resnet", "c8cnn"], "angles": [0], "epochs": 1,
                        "train_subset": 600, "test_subset": 200, "batch_size": 50, "lr": [3e-3], "asha": False,
                        "max_concurrent": 2, "eval_suites": ["rotation", "affine"], "model_config": TINY})
    result = _finish(queue, job.id, worker, timeout=900).result
    for model in ("effcaps", "resnet", "c8cnn"):
        m = result["models"][model]
        assert m["cols"][-2:] == ["rotation_auc", "affine-mnist"] and len(m["cols"]) == 15
        assert all(v is not None for v in m["mean"][0]), (model, m["mean"])
    text = CliRunner().invoke(main, ["--redis-url", redis_url, "results", job.id]).output
    assert "effcaps:" in text and "c8cnn:" in text and "rotation_auc" in text


# Every model, shrunk: `capsctl tune --model-config MODEL.KEY=VALUE` pairs (lenet5 is small already).
TINY_ALL = {**TINY, "capsnet": {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": [32, 64]}}
ALL_MODELS = ("capsnet", "effcaps", "resnet", "c8cnn", "lenet5")


def test_tune_from_the_cli_builds_a_matrix_with_every_model(queue: JobQueue, workers, redis_url: str) -> None:
    """`capsctl tune --models capsnet,effcaps,resnet,c8cnn,lenet5 --angles 0,35`, as a user types it
    (with tiny widths and data): one matrix per model, every cell measured."""
    worker = workers("w-zoo-all")
    overrides = [f"--model-config={model}.{key}={json.dumps(value)}"
                 for model, config in TINY_ALL.items() for key, value in config.items()]
    submitted = CliRunner().invoke(main, [
        "--redis-url", redis_url, "tune", "--models", ",".join(ALL_MODELS), "--angles", "0,35",
        "--epochs", "1", "--train-subset", "400", "--test-subset", "200", "--batch-size", "50", "--lr", "3e-3",
        "--no-asha", "--max-concurrent", "2", *overrides])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    spec = queue.get(job_id).spec
    assert spec["models"] == list(ALL_MODELS) and spec["model_config"] == TINY_ALL
    result = _finish(queue, job_id, worker, timeout=1200).result
    assert set(result["models"]) == set(ALL_MODELS)
    for model in ALL_MODELS:
        m = result["models"][model]
        assert m["rows"] == ["shift2", "shift2+rot35"] and m["cols"] == ["0", "35"], (model, m)
        assert all(0 <= v <= 1 for row in m["mean"] for v in row), (model, m["mean"])
        assert m["n"] == [[1, 1], [1, 1]], (model, m["n"])
    text = CliRunner().invoke(main, ["--redis-url", redis_url, "results", job_id]).output
    assert all(f"{model}:" in text for model in ALL_MODELS), text
