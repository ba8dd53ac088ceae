"""``capsctl artifacts`` against a real S3 API (moto in server mode on a free port) and a real
Redis: a job's checkpoint recorded as ``s3://bucket/runs/...`` comes back and loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from capsnet_core import build_model
from capsnet_core.checkpoint import load_checkpoint, save_checkpoint
from services.artifacts import exists, join, list_files, read_bytes, write_bytes
from services.cli import main
from services.queue.jobqueue import JobQueue
from services.stack.processes import free_port

moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server with bucket ``bucket``; the AWS_* environment points at it."""
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bucket")
    try:
        yield endpoint
    finally:
        server.stop()


def test_the_artifact_store_reads_and_lists_s3(s3: str) -> None:
    root = "s3://bucket/runs"
    write_bytes(join(root, "J", "plots", "a.png"), b"png")
    write_bytes(join(root, "J", "epoch-0001", "checkpoint.pt"), b"pt")
    assert exists(join(root, "J", "plots", "a.png")) and not exists(join(root, "J", "nope"))
    assert list(list_files(join(root, "J"))) == ["epoch-0001/checkpoint.pt", "plots/a.png"]
    assert read_bytes(join(root, "J", "plots", "a.png")) == b"png"


def test_capsctl_artifacts_downloads_a_checkpoint_from_s3(s3: str, queue: JobQueue, redis_url: str,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    job = queue.submit({"kind": "train", "model": "lenet5", "epochs": 1})
    claimed = queue.claim("w-s3")
    assert claimed is not None and claimed.job_id == job.id
    local = save_checkpoint(tmp_path / "made" / "checkpoint.pt", build_model("lenet5"), epoch=1)
    folder = join("s3://bucket/runs", job.id, "epoch-0001")
    write_bytes(join(folder, "checkpoint.pt"), local.read_bytes())
    write_bytes(join("s3://bucket/runs", job.id, "plots", "accuracy_vs_angle.png"), b"\x89PNG")
    assert queue.set_checkpoint(job.id, claimed.token, folder)
    assert queue.complete(job.id, claimed.token, {"checkpoint": folder, "rotation_accuracy": {"0": 0.9}})

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "--artifacts", "s3://bucket/runs", "artifacts",
                                       job.id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = result.output.split()
    assert str(out / "checkpoint" / "checkpoint.pt") in printed and str(out / "plots" / "accuracy_vs_angle.png") in printed
    assert load_checkpoint(out / "checkpoint" / "checkpoint.pt")["epoch"] == 1
    assert json.loads((out / "result.json").read_text())["checkpoint"] == folder
    assert (out / "events.jsonl").read_text().strip()

    only = CliRunner().invoke(main, ["--redis-url", redis_url, "artifacts", job.id, "--out", str(tmp_path / "o2"),
                                     "--what", "checkpoint"])
    assert only.exit_code == 0 and only.output.split() == [str(tmp_path / "o2" / "checkpoint" / "checkpoint.pt")]
    bad = CliRunner().invoke(main, ["--redis-url", redis_url, "artifacts", job.id, "--what", "weights"])
    assert bad.exit_code == 2 and "choose from checkpoint,plots,results,logs" in bad.output


@pytest.mark.slow
def test_a_killed_job_resumes_from_its_s3_checkpoint_and_evaluates_from_it(
        s3: str, queue: JobQueue, redis_url: str, ray_cluster: str, tmp_path: Path) -> None:
    from ..service_helpers import WorkerProcess, service_env, wait_until

    env = service_env(redis_url, ray_cluster, "s3://bucket/runs")  # AWS_* from the s3 fixture
    job = queue.submit({"kind": "train", "model": "lenet5", "workers": 1, "batch_size": 64, "epochs": 3,
                        "train_subset": 1500, "test_subset": 200, "eval_angles": [0], "max_retries": 0})
    first = WorkerProcess("w-s3-doomed", env, tmp_path / "first.log")
    try:
        wait_until(lambda: (r := queue.get(job.id)) and r.checkpoint and r.state == "running", 180, interval=0.1,
                   what=f"a first checkpoint; log:\n{first.output()[-3000:]}")
    finally:
        first.kill()
        first.stop()
    checkpoint = queue.get(job.id).checkpoint
    assert checkpoint.startswith(f"s3://bucket/runs/{job.id}/epoch-"), checkpoint
    done_before_kill = int(checkpoint.rsplit("-", 1)[1])
    assert exists(join(checkpoint, "checkpoint.pt"))

    second = WorkerProcess("w-s3-rescuer", env, tmp_path / "second.log")
    try:
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 240,
                            what=f"the job to finish elsewhere; log:\n{second.output()[-3000:]}")
        assert record.state == "succeeded", (record.error, record.traceback)
        resumed = [e["data"] for _, e in queue.events.read(job.id)
                   if e["type"] == "log" and "resumed_from_epoch" in e["data"]]
        assert resumed and resumed[0]["resumed_from_epoch"] == done_before_kill, resumed
        final = record.result["checkpoint"]
        assert str(final).startswith("s3://bucket/runs/"), final
        evaluation = queue.submit({"kind": "eval", "source": job.id, "angles": [0], "test_subset": 200})
        done = wait_until(lambda: (r := queue.get(evaluation.id)) and r.is_terminal and r, 120,
                          what=f"the eval; log:\n{second.output()[-3000:]}")
        assert done.state == "succeeded", (done.error, done.traceback)
    finally:
        second.stop()
    out = tmp_path / "downloaded"
    got = CliRunner().invoke(main, ["--redis-url", redis_url, "artifacts", job.id, "--out", str(out),
                                    "--what", "checkpoint"])
    assert got.exit_code == 0, got.output
    assert load_checkpoint(out / "checkpoint" / "checkpoint.pt")["epoch"] == 3
