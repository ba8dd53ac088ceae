"""The Python client against real services: Redis, a local Ray cluster and a `capsctl worker`
process training two tiny LeNet5 jobs on real MNIST. Nothing here is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.client import Client
from services.spec.results import RESULT_VERSION, JobResult

pytestmark = pytest.mark.slow

TINY_LENET = {"model": "lenet5", "workers": 1, "epochs": 2, "batch_size": 128, "train_subset": 256,
              "test_subset": 100, "eval_angles": [0, 45]}


def test_client_trains_two_jobs_follows_waits_compares_and_cancels(redis_url: str, workers, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CAPSNET_ARTIFACTS", str(tmp_path / "artifacts"))  # what the worker writes to
    caps = Client(redis_url=redis_url)
    first = caps.submit(TINY_LENET, name="plain")
    second = caps.submit(TINY_LENET, name="rotated", augment="shift2+rot15")
    behind = caps.submit(TINY_LENET, name="never")  # queued behind the other two: one worker, one job at a time
    assert caps.cancel(behind) == "cancelled"
    worker = workers("w-client")

    for job in (first, second):
        final = caps.wait(job, timeout=240)
        assert final.state == "succeeded", (final.error, worker.output()[-3000:])
    assert caps.get(behind).state == "cancelled" and caps.get(behind).attempt == 0

    events = list(caps.follow(first))
    epochs = [e.data["epoch"] for e in events if e.type == "progress" and e.data.get("type") == "epoch"]
    assert epochs == [1, 2]
    assert [e.data["state"] for e in events if e.type == "state"][-2:] == ["running", "succeeded"]

    result = caps.results(first)
    assert isinstance(result, JobResult) and result.version == RESULT_VERSION and result.kind == "train"
    assert set(result.rotation_accuracy or {}) == {"0", "45"}
    assert all(0.0 <= v <= 1.0 for v in (result.rotation_accuracy or {}).values())
    assert [h["epoch"] for h in result.history or []] == [1, 2]

    comparison = caps.compare([first, second])
    assert [(r.job, r.name, r.epochs) for r in comparison.runs] == [(first.id, "plain", 2), (second.id, "rotated", 2)]
    assert comparison.angles == ["0", "45"]
    copied = caps.artifacts(first, tmp_path / "download")
    assert any(copied.rglob("checkpoint.pt"))
    caps.close()
