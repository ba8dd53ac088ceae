"""The new models and test suites through the service: a real Redis, a local Ray cluster and
`capsctl worker` processes. A 2-rank Ray Train (gloo DDP) job of the e2cnn model with both suites,
an eval job of its checkpoint, and a tune sweep over the three new models."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from capsnet_core.suites import ROTATION_SUITE_ANGLES
from services.cli import main
from services.queue import JobQueue

from .service_helpers import wait_until

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
    job = queue.submit({"kind": "train", "model": "c8cnn", "workers": 2, "epochs": 1, "batch_size": 50,
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
