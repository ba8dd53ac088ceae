"""The Python client (services.client) against a real redis-server, with the test playing the
worker through the queue's own calls: validation, listing, following, waiting, results, cancel,
artifacts and compare, each the same as the CLI's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import main
from services.client import Client, WaitTimeout
from services.queue.errors import JobNotFound, JobStateError
from services.queue.jobqueue import JobQueue
from services.results.job_results import NoResults
from services.spec.errors import SpecError
from services.spec.results import RESULT_VERSION, JobResult

CPU = {"gpus": 0, "cpus": 4}


@pytest.fixture
def caps(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CAPSNET_ARTIFACTS", str(tmp_path / "artifacts"))
    with Client(redis_url=redis_url) as c:
        yield c


def _finish(queue: JobQueue, job_id: str, rotation: dict[str, float]) -> None:
    """Play a worker: claim the job, report two epochs, store a typed result."""
    queue.register_worker("w-test", {"hostname": "testhost", "resources": CPU})
    claimed = queue.claim("w-test", CPU)
    assert claimed is not None and claimed.job_id == job_id
    for epoch in (1, 2):
        assert queue.report_progress(job_id, claimed.token, {"type": "epoch", "epoch": epoch, "epochs": 2})
    result = JobResult.new("train", rotation_accuracy=rotation, history=[{"epoch": 1}, {"epoch": 2}],
                           checkpoint=f"/runs/{job_id}/epoch-0002")
    assert queue.complete(job_id, claimed.token, result.to_document())


def test_submit_takes_spec_fields_and_refuses_what_the_cli_refuses(caps: Client) -> None:
    record = caps.submit({"model": "lenet5", "epochs": 3}, name="nb-1", lr=2e-3)
    assert record.state == "queued" and record.kind == "train" and record.model == "lenet5"
    assert record.spec["epochs"] == 3 and record.spec["lr"] == 2e-3 and record.name == "nb-1"
    with pytest.raises(SpecError, match=r"^gpus: ") as bad:
        caps.submit(model="lenet5", gpus=-1)
    assert "\n" not in str(bad.value)
    with pytest.raises(SpecError, match="source: no job j-zzzzzzzz-zzzz in Redis"):
        caps.eval("j-zzzzzzzz-zzzz")
    study = caps.tune(models=["lenet5"], angles=[0, 30], epochs=1)
    assert study.kind == "tune" and study.spec["angles"] == [0, 30]
    evaluation = caps.eval(record.id, angles=[0, 90])
    assert evaluation.kind == "eval" and evaluation.spec["source"] == record.id
    assert [r.id for r in caps.list(kind="tune")] == [study.id]
    assert {r.id for r in caps.list(model="lenet5", kind="train")} == {record.id}
    assert len(caps.list(state="queued", limit=2)) == 2
    with pytest.raises(JobNotFound, match="no job j-nosuch"):
        caps.get("j-nosuch")


def test_follow_wait_results_compare_and_artifacts_of_finished_jobs(caps: Client, queue: JobQueue,
                                                                   tmp_path: Path) -> None:
    first = caps.submit(model="lenet5", epochs=2, name="upright", eval_angles=[0, 45])
    second = caps.submit(model="capsnet", epochs=2, eval_angles=[0, 45],
                           model_config={"conv_channels": 16, "primary_maps": 4})
    with pytest.raises(WaitTimeout, match=f"job {first.id} is still queued after 0.2 s"):
        caps.wait(first, timeout=0.2)
    with pytest.raises(NoResults, match="has no results yet"):
        caps.results(first)
    _finish(queue, first.id, {"0": 0.98, "45": 0.61})
    _finish(queue, second.id, {"0": 0.97, "45": 0.74})

    assert caps.wait(first.id, timeout=5).state == "succeeded"
    events = list(caps.follow(first))
    epochs = [e.data["epoch"] for e in events if e.type == "progress" and e.data.get("type") == "epoch"]
    assert epochs == [1, 2] and events[-1].type == "state" and events[-1].data["state"] == "succeeded"

    result = caps.results(first)
    assert isinstance(result, JobResult) and result.version == RESULT_VERSION
    assert result.rotation_accuracy == {"0": 0.98, "45": 0.61}

    comparison = caps.compare([first, second.id])
    assert [(r.job, r.model, r.accuracy["45"]) for r in comparison.runs] == [
        (first.id, "lenet5", 0.61), (second.id, "capsnet", 0.74)]
    assert comparison.angles == ["0", "45"]

    with pytest.raises(FileNotFoundError, match=f"no files for job {first.id}"):
        caps.artifacts(first, tmp_path / "out")
    plots = tmp_path / "artifacts" / first.id / "plots"
    plots.mkdir(parents=True)
    (plots / "accuracy_vs_angle.png").write_bytes(b"\x89PNG fake")
    copied = caps.artifacts(first, tmp_path / "out")
    assert (copied / "plots" / "accuracy_vs_angle.png").read_bytes() == b"\x89PNG fake"


def test_results_and_compare_are_what_the_cli_prints(caps: Client, queue: JobQueue, redis_url: str) -> None:
    a = caps.submit(model="lenet5", epochs=2)
    b = caps.submit(model="lenet5", epochs=2, augment="shift2+rot15")
    _finish(queue, a.id, {"0": 0.99, "30": 0.8})
    _finish(queue, b.id, {"0": 0.98, "30": 0.9})

    def capsctl(*args: str) -> dict:
        out = CliRunner().invoke(main, ["--redis-url", redis_url, *args])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    assert capsctl("results", a.id, "--json")["result"] == caps.results(a).to_document()
    cli_compare = capsctl("compare", a.id, b.id, "--json")
    assert {k: v for k, v in cli_compare.items() if k != "plot"} == json.loads(
        json.dumps(caps.compare([a, b]).to_dict()))


def test_cancel_a_queued_job_and_not_a_finished_one(caps: Client, queue: JobQueue) -> None:
    done, waiting = caps.submit(model="lenet5"), caps.submit(model="lenet5")
    _finish(queue, done.id, {"0": 0.9})
    assert caps.cancel(waiting.id) == "cancelled"
    assert caps.wait(waiting, timeout=5).state == "cancelled"
    with pytest.raises(JobStateError, match="already succeeded"):
        caps.cancel(done)
