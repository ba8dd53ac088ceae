"""Experiment tracking against real services: a real ``mlflow server`` (sqlite backend, local
artifact root) started here on a free port, real Redis, a real Ray cluster and `capsctl worker`,
real MNIST. A train job logs its spec, curves, results, plots and checkpoint to MLflow, writes
TensorBoard event files and a training-curve PNG; with MLflow down it still succeeds."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import main
from services.queue.jobqueue import JobQueue
from services.stack.processes import free_port

from .service_helpers import wait_until

TINY_TRACKED = {"kind": "train", "model": "lenet5", "cpu_ranks": 1, "epochs": 2, "batch_size": 64, "train_subset": 1000,
                "val_split": 300, "test_subset": 300, "eval_angles": [0, 35], "lr": 2e-3}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on a free port; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _healthy(url) or proc.poll() is not None, 120, interval=0.5, what="mlflow server /health")
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _logs(queue: JobQueue, job_id: str) -> list[dict]:
    return [e["data"] for _, e in queue.events.read(job_id) if e["type"] == "log"]


def _scalar_tags(folder: Path) -> set[str]:
    """The scalar tags in TensorBoard event files (TFRecord framing, tensorboardX's Event proto)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            at += 12 + length + 4
    return tags


def _finished(queue: JobQueue, job_id: str, worker) -> object:
    return wait_until(lambda: (r := queue.get(job_id)) and r.is_terminal and r, 240,
                      what=f"job {job_id} to finish; worker log:\n{worker.output()[-3000:]}")


@pytest.mark.slow
def test_train_job_logs_spec_curves_results_and_checkpoint_to_mlflow(queue: JobQueue, workers, redis_url: str,
                                                                     mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    job = queue.submit({**TINY_TRACKED, "name": "tracked-lenet", "mlflow_uri": mlflow_server,
                        "mlflow_experiment": "rotation-study"})
    record = _finished(queue, job.id, workers("w-track"))
    assert record.state == "succeeded", (record.error, record.traceback)

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("rotation-study")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tracked-lenet" and run.info.status == "FINISHED"
    assert run.data.params["model"] == "lenet5" and run.data.params["epochs"] == "2"
    assert run.data.params["eval_angles"] == "[0.0, 35.0]"
    assert run.data.tags["capsctl.job_id"] == job.id and run.data.tags["capsctl.kind"] == "train"
    for metric in ("train_loss", "train_accuracy", "val_accuracy", "images_per_second"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == pytest.approx(
        [h["val_accuracy"] for h in record.result["history"]])
    for angle, accuracy in record.result["rotation_accuracy"].items():
        assert run.data.metrics[f"rotation_accuracy/{angle}"] == pytest.approx(accuracy)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {"checkpoint/checkpoint.pt"}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/accuracy_vs_angle.png", "plots/training_curve.png"} <= plots
    downloaded = client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(Path(record.result[
        "checkpoint"]).parent / "from-mlflow"))
    import torch

    assert torch.load(downloaded, map_location="cpu", weights_only=True)["epoch"] == 2

    # The training curve beside the angle plot, and TensorBoard files beside the checkpoints.
    folder = Path(record.result["checkpoint"]).parent
    assert (folder / "plots" / "training_curve.png").stat().st_size > 5000
    assert Path(record.result["tensorboard"]) == folder / "tensorboard"
    assert {"ray/tune/train_loss", "ray/tune/val_accuracy", "ray/tune/images_per_second",
            "ray/tune/rotation_accuracy/35"} <= _scalar_tags(folder / "tensorboard")
    out = CliRunner().invoke(main, ["--redis-url", redis_url, "results", job.id])
    assert out.exit_code == 0, out.output
    assert f"tensorboard --logdir {folder / 'tensorboard'}" in out.output
    assert not [e for e in _logs(queue, job.id) if e.get("level") == "warning"]


@pytest.mark.slow
def test_mlflow_down_never_fails_the_job_one_warning_and_a_count(queue: JobQueue, workers) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = queue.submit({**TINY_TRACKED, "mlflow_uri": closed})
    record = _finished(queue, job.id, workers("w-untracked"))
    assert record.state == "succeeded", (record.error, record.traceback)
    logs = _logs(queue, job.id)
    warnings = [e for e in logs if e.get("level") == "warning"]
    assert len(warnings) == 1 and warnings[0]["message"].startswith(f"MLflow tracking at {closed} failed")
    dropped = [e["mlflow_dropped"] for e in logs if "mlflow_dropped" in e]
    assert len(dropped) == 1 and dropped[0] >= 4  # params, 2 epochs, results, artifacts...


def test_submit_stores_the_tracking_target_in_the_spec(queue: JobQueue, redis_url: str) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["--redis-url", redis_url, "submit", "lenet5", "--mlflow", "http://mlflow.example:5000",
                               "--mlflow-experiment", "angles"])
    assert out.exit_code == 0, out.output
    spec = queue.get(out.output.strip()).spec
    assert spec["mlflow_uri"] == "http://mlflow.example:5000" and spec["mlflow_experiment"] == "angles"
    # CAPSNET_MLFLOW_URI stands in for --mlflow.
    out = runner.invoke(main, ["--redis-url", redis_url, "eval", out.output.strip()],
                        env={"CAPSNET_MLFLOW_URI": "http://env.example:5000"})
    assert out.exit_code == 0, out.output
    assert queue.get(out.output.strip()).spec["mlflow_uri"] == "http://env.example:5000"


def test_submit_with_a_tracking_uri_and_no_mlflow_is_a_one_line_error(redis_url: str) -> None:
    # A Python where `import mlflow` finds nothing, as where the extra is not installed.
    code = ("import sys; sys.modules['mlflow'] = None; from services.cli import main; "
            "main(['--redis-url', sys.argv[1], 'submit', 'lenet5', '--mlflow', 'http://127.0.0.1:5000'])")
    done = subprocess.run([sys.executable, "-c", code, redis_url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("Error: --mlflow: MLflow tracking needs the mlflow package: "
                                   "pip install 'capsctl[mlflow]'")


@pytest.mark.slow
def test_sweep_logs_trials_as_child_runs_and_eval_logs_its_results(queue: JobQueue, workers, redis_url: str,
                                                                   mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    sweep = queue.submit({"kind": "tune", "models": ["lenet5"], "angles": [0, 45], "eval_angles": [0, 45], "epochs": 2,
                          "train_subset": 600, "val_split": 200, "test_subset": 300, "batch_size": 64, "asha": False,
                          "name": "tracked-sweep", "mlflow_uri": mlflow_server, "mlflow_experiment": "sweeps"})
    worker = workers("w-track-sweep")
    record = _finished(queue, sweep.id, worker)
    assert record.state == "succeeded", (record.error, record.traceback)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`capsctl.kind` = 'tune'")
    assert len(parent) == 1 and parent[0].info.run_name == "tracked-sweep"
    parent_id = parent[0].info.run_id
    assert parent[0].data.params["angles"] == "[0.0, 45.0]"
    assert {"matrix/tune_matrix.csv", "matrix/heatmap-lenet5.png"} <= {
        a.path for a in client.list_artifacts(parent_id, "matrix")}
    assert {a.path for a in client.list_artifacts(parent_id, "best_checkpoint/lenet5")} == {
        "best_checkpoint/lenet5/checkpoint.pt"}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    trials = {t["key"]: t for t in record.result["trials"]}
    assert {c.info.run_name for c in children} == set(trials)
    for child in children:
        trial = trials[child.info.run_name]
        assert child.data.params["augment"] == trial["augment"] and child.info.status == "FINISHED"
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in curve] == [1, 2]
        for angle, accuracy in trial["rotation_accuracy"].items():
            assert child.data.metrics[f"rotation_accuracy/{angle}"] == pytest.approx(accuracy)
        # The curve is logged as the trial trains, not when the sweep ends: its first epoch
        # reached MLflow before the trial reported its end.
        ended_ms = min(int(entry_id.split("-")[0]) for entry_id, e in queue.events.read(sweep.id)
                       if e["type"] == "progress" and e["data"].get("trial") == child.info.run_name
                       and e["data"].get("status") in ("finished", "early_stopped"))
        assert curve[0].timestamp <= ended_ms, (curve[0].timestamp, ended_ms)
    # Ray Tune's own TensorBoard logger wrote one event file per trial; `results` names the folder.
    experiment_dir = Path(record.result["experiment"])
    assert len(list(experiment_dir.glob("*/events.out.tfevents.*"))) == len(trials)
    out = CliRunner().invoke(main, ["--redis-url", redis_url, "results", sweep.id])
    assert out.exit_code == 0 and f"tensorboard --logdir {experiment_dir}" in out.output, out.output

    # An eval of one trial's checkpoint: its own run with the per-angle results.
    checkpoint = next(iter(trials.values()))["checkpoint"]
    job = queue.submit({"kind": "eval", "source": checkpoint, "angles": [0, 30], "test_subset": 300,
                        "mlflow_uri": mlflow_server, "mlflow_experiment": "sweeps"})
    evaluated = _finished(queue, job.id, worker)
    assert evaluated.state == "succeeded", (evaluated.error, evaluated.traceback)
    run = client.search_runs([experiment], filter_string="tags.`capsctl.kind` = 'eval'")
    assert len(run) == 1 and run[0].info.run_name == job.id
    assert run[0].data.tags["capsctl.model"] == "lenet5" and run[0].data.params["source"] == checkpoint
    assert run[0].data.metrics["rotation_accuracy/30"] == pytest.approx(evaluated.result["rotation_accuracy"]["30"])
    assert {a.path for a in client.list_artifacts(run[0].info.run_id)} == {"results.json"}


@pytest.mark.slow
def test_a_later_attempt_continues_the_sweep_run_and_each_trial_curve(mlflow_server: str) -> None:
    # A worker killed mid-sweep leaves its runs open; the next attempt finds them again: one
    # sweep run, one child per trial, and an epoch logged before the kill is not logged twice.
    from mlflow.tracking import MlflowClient

    from services.runs.sweep_tracking import SweepRuns
    from services.runs.tracking import Tracker, TrackingTarget

    target = TrackingTarget(uri=mlflow_server, experiment="resumed-sweeps", run_name="sweep-1",
                            tags={"capsctl.job_id": "j-resumed", "capsctl.kind": "tune"})
    warnings: list[str] = []
    trial = {"key": "lenet5-none-0", "model": "lenet5", "augment": "none", "lr": 0.001, "seed": 0}
    first = SweepRuns(Tracker.start(target, lambda message, **_: warnings.append(message)))
    first.epoch(trial, {"epoch": 1, "train_loss": 2.0, "val_accuracy": 0.3})  # then the worker is killed
    second = SweepRuns(Tracker.start(target, lambda message, **_: warnings.append(message)))
    assert second.sweep.run_id == first.sweep.run_id
    for epoch, loss in ((1, 2.0), (2, 1.5)):  # Tune restores the trial and reports epoch 1 again
        second.epoch(trial, {"epoch": epoch, "train_loss": loss, "val_accuracy": 0.3 + epoch / 10})
    second.final({**trial, "status": "finished", "epochs_trained": 2, "val_accuracy": 0.5,
                  "rotation_accuracy": {"0": 0.6}, "history": [{"epoch": 1, "train_loss": 2.0},
                                                              {"epoch": 2, "train_loss": 1.5}]})
    second.sweep.finish()
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("resumed-sweeps").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{first.sweep.run_id}'")
    assert [c.info.run_name for c in children] == [trial["key"]] and children[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "train_loss")] == [1, 2]
    assert children[0].data.metrics["rotation_accuracy/0"] == pytest.approx(0.6)
    assert children[0].data.tags["capsctl.status"] == "finished"
    assert warnings == []
