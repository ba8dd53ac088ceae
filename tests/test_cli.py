"""capsctl's CLI against a real Redis (conftest's ``redis_url``): click's CliRunner in-process,
plus the main commands once as real ``capsctl`` subprocesses. Jobs are driven through the
queue API (claim -> progress -> complete), so no Ray is needed here.

Exit codes checked: 0 ok, 1 job failed / could not do it (unknown job, Redis unreachable),
2 bad usage or invalid spec (nothing enqueued).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import main
from services.config import Settings
from services.queue.jobqueue import JobQueue

from .conftest import REPO_ROOT, free_port

RESULT = {
    "rotation_accuracy": {"0": 0.981, "15": 0.953, "35": 0.762},
    "per_class": {a: [0.9 + 0.005 * c for c in range(10)] for a in ("0", "15", "35")},
    "history": [
        {"epoch": 1, "train_loss": 0.31, "train_accuracy": 0.91, "test_accuracy": 0.95, "lr": 1e-3,
         "epoch_seconds": 12.5, "images_per_second": 4800.0},
        {"epoch": 2, "train_loss": 0.12, "train_accuracy": 0.97, "test_accuracy": 0.98, "lr": 9e-4,
         "epoch_seconds": 12.1, "images_per_second": 4950.0},
    ],
    "world_size": 2, "device": "cpu", "checkpoint": "/tmp/artifacts/j-x/epoch-0002",
}


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A clean capsctl environment: this test's Redis, a private state dir, no Ray, no CAPSCTL_*."""
    for key in list(os.environ):
        if key.startswith("CAPSCTL_") or key in ("RAY_ADDRESS", "CAPSNET_REDIS_PREFIX"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CAPSNET_REDIS_URL", redis_url)
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CAPSNET_ARTIFACTS", str(tmp_path / "artifacts"))
    return {"CAPSNET_REDIS_URL": redis_url, "CAPSNET_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def queue(env: dict[str, str]) -> JobQueue:
    q = JobQueue.from_settings(Settings.from_env())
    yield q
    q.client.close()


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, f"capsctl {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def drive(queue: JobQueue, job_id: str, *, fail: str | None = None, result: dict | None = None) -> None:
    """Play a worker: claim, report step/epoch/eval progress and a log line, then finish."""
    queue.register_worker("w-test", {"hostname": "testhost", "resources": {"gpus": 0, "cpus": 4},
                                     "metrics_url": "http://testhost:9310/metrics"})
    claimed = queue.claim("w-test", {"gpus": 0, "cpus": 4})
    assert claimed is not None and claimed.job_id == job_id
    queue.events.log(job_id, "loading mnist", level="info")
    for epoch in (1, 2):
        for step in (50, 100):
            assert queue.report_progress(job_id, claimed.token, {
                "type": "step", "epoch": epoch, "epochs": 2, "step": step, "steps_per_epoch": 100,
                "loss": 0.5 / epoch, "accuracy": 0.9, "images_per_second": 4800.0, "lr": 1e-3})
        assert queue.report_progress(job_id, claimed.token, {
            "type": "epoch", "epoch": epoch, "epochs": 2, "step": 100, "steps_per_epoch": 100,
            "loss": 0.3 / epoch, "accuracy": 0.95, "images_per_second": 4900.0, "lr": 1e-3,
            "test_accuracy": 0.96})
    assert queue.report_progress(job_id, claimed.token, {
        "type": "eval", "epoch": 2, "epochs": 2, "test_accuracy": {"0": 0.981, "15": 0.953, "35": 0.762}})
    assert queue.set_checkpoint(job_id, claimed.token, RESULT["checkpoint"])
    if fail:
        assert queue.fail(job_id, claimed.token, fail, "Traceback: boom", retry=False)
    else:
        assert queue.complete(job_id, claimed.token, result or RESULT)


# ----------------------------------------------------------------------------- submit


def test_submit_prints_id_and_enqueues_the_spec(queue: JobQueue) -> None:
    out = run("submit", "capsnet", "--epochs", "3", "--batch-size", "64", "--lr", "0.002", "--lr-decay", "0.9",
              "--augment", "shift2+rot15", "--eval-angles", "0,15,35,-45", "--priority", "high",
              "--name", "first", "--seed", "7", "--max-retries", "1", "--cpu-ranks", "2",
              "--train-subset", "1000", "--test-subset", "500", "--model-config", "routing_iters=2",
              "--dataset", "fashion-mnist").output
    job_id = out.strip()
    assert job_id.startswith("j-") and "\n" not in job_id
    record = queue.get(job_id)
    assert record is not None and record.state == "queued" and record.priority == "high"
    spec = record.spec
    assert spec["kind"] == "train" and spec["model"] == "capsnet" and spec["epochs"] == 3
    assert spec["batch_size"] == 64 and spec["lr"] == 0.002 and spec["lr_decay"] == 0.9
    assert spec["augment"] == "shift2+rot15" and spec["eval_angles"] == [0.0, 15.0, 35.0, -45.0]
    assert spec["cpu_ranks"] == 2 and spec["gpus"] == 0 and spec["seed"] == 7 and spec["max_retries"] == 1
    assert spec["train_subset"] == 1000 and spec["test_subset"] == 500 and spec["name"] == "first"
    assert spec["model_config"] == {"routing_iters": 2} and spec["dataset"] == "fashion-mnist"
    assert record.cpus == 2

    data = json.loads(run("submit", "lenet5", "--json").output)
    assert data["id"].startswith("j-") and data["state"] == "queued" and data["model"] == "lenet5"
    assert data["spec"]["epochs"] == 10  # jobspec's defaults apply to what was not given
    assert "lease_token" not in data

    ev = json.loads(run("eval", job_id, "--angles", "0,90", "--test-subset", "100", "--json").output)
    assert ev["spec"] == {**ev["spec"], "kind": "eval", "source": job_id, "angles": [0.0, 90.0], "test_subset": 100}

    tune = json.loads(run("tune", "--models", "capsnet,lenet5", "--angles", "0,30", "--augment",
                          "shift2,shift2+rot30", "--lr", "0.001,0.0003", "--routing-iters", "1,3", "--seeds", "2",
                          "--epochs", "1", "--max-concurrent", "2", "--no-asha", "--model-config",
                          "capsnet.routing_iters=2", "--json").output)
    spec = tune["spec"]
    assert spec["models"] == ["capsnet", "lenet5"] and spec["angles"] == [0.0, 30.0]
    assert spec["augment"] == ["shift2", "shift2+rot30"] and spec["lr"] == [0.001, 0.0003]
    assert spec["routing_iters"] == [1, 3] and spec["seeds"] == 2 and spec["asha"] is False
    assert spec["model_config"] == {"capsnet": {"routing_iters": 2}}
    assert len(queue.list()) == 4


INVALID_SUBMITS = [
    (["--epochs", "0"], "--epochs: must be an integer in 1..1000"),
    (["--lr", "2"], "--lr: must be a number in (0, 1]"),
    (["--batch-size", "0"], "--batch-size: must be an integer"),
    (["--eval-angles", "0,200"], "--eval-angles: angle 200 is outside [-180, 180]"),
    (["--eval-angles", "0,15,15"], "--eval-angles: duplicate angle 15"),
    (["--eval-angles", "0,x"], "'--eval-angles'"),
    (["--augment", "spin3"], "--augment: unknown augmentation 'spin3'"),
    (["--gpus", "1", "--cpu-ranks", "2"], "--gpus and --cpu-ranks are mutually exclusive"),
    (["--model-config", "nonsense=1"], "model_config.nonsense: unknown"),
    (["--model-config", "conv_channels=-3"], "model_config.conv_channels"),
    (["--model-config", "novalue"], "expected key=value"),
    (["--train-subset", "0"], "--train-subset: must be an integer in 1..60000"),
    (["--max-retries", "99"], "--max-retries: must be an integer in 0..20"),
    (["--name", " "], "--name: must not be blank"),
    (["--priority", "urgent"], "'--priority'"),
    (["--cpu-ranks", "4", "--batch-size", "2"], "--batch-size: must be at least the number of ranks"),
    (["--seed", "-1"], "--seed: must be an integer in 0..4294967295"),
    (["--epochs", "many"], "'--epochs'"),
]


def test_invalid_submits_exit_2_with_their_own_one_line_error(queue: JobQueue) -> None:
    seen = set()
    for args, expected in INVALID_SUBMITS:
        result = CliRunner().invoke(main, ["submit", "capsnet", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        lines = error_lines(result.output)
        assert len(lines) == 1, (args, result.output)
        assert expected in lines[0], (args, lines[0])
        assert "Traceback" not in result.output
        seen.add(lines[0])
    assert len(seen) == len(INVALID_SUBMITS)  # each its own message
    bad_model = CliRunner().invoke(main, ["submit", "vgg16"])
    assert bad_model.exit_code == 2 and "'vgg16' is not one of" in bad_model.output
    assert "Invalid value for 'MODEL'" in bad_model.output and "'capsnet'" in bad_model.output
    bad_tune = CliRunner().invoke(main, ["tune", "--angles", "0,15", "--augment", "shift2"])
    assert bad_tune.exit_code == 2
    assert error_lines(bad_tune.output) == ["Error: --augment: must list one preset per training angle "
                                            "(2 angles, got 1 presets)"]
    assert queue.list() == []


def test_cpu_ranks_replaces_workers(queue: JobQueue) -> None:
    """``--workers`` is gone from submit; a spec that still says ``workers`` (an old record or job
    file) reads as ``cpu_ranks`` and is stored under the new name."""
    gone = CliRunner().invoke(main, ["submit", "lenet5", "--workers", "2"])
    assert gone.exit_code == 2 and "No such option '--workers'" in gone.output
    old = queue.submit({"kind": "train", "model": "lenet5", "workers": 2, "batch_size": 64})
    stored = queue.get(old.id)
    assert stored is not None and stored.spec["cpu_ranks"] == 2 and "workers" not in stored.spec
    assert stored.cpus == 2
    help_text = run("submit", "--help").output
    assert "--cpu-ranks" in help_text and "--workers" not in help_text
    assert "(1..1000; default 10)" in help_text and "default 0,15,35)" in help_text  # read from TrainSpec
    assert len(queue.list()) == 1


def test_idempotent_submit_and_capacity(queue: JobQueue) -> None:
    first = run("submit", "capsnet", "--idempotency-key", "nightly-1").output.strip()
    again = run("submit", "capsnet", "--idempotency-key", "nightly-1").output.strip()
    assert first == again and len(queue.list()) == 1

    queue.register_worker("gpu-box", {"hostname": "gpu-box", "resources": {"gpus": 2, "cpus": 16}})
    too_big = CliRunner().invoke(main, ["submit", "capsnet", "--gpus", "4"])
    assert too_big.exit_code == 2
    assert error_lines(too_big.output) and "gpus: job needs 4 GPU(s)" in error_lines(too_big.output)[0]
    assert "largest: 2 GPUs" in too_big.output
    assert len(queue.list()) == 1
    fits = run("submit", "capsnet", "--gpus", "2", "--json").output
    assert json.loads(fits)["gpus"] == 2


def test_cancel_retry_and_user_errors(queue: JobQueue) -> None:
    job_id = run("submit", "lenet5", "--epochs", "1").output.strip()
    assert f"cancelled {job_id}" in run("cancel", job_id).output
    assert queue.get(job_id).state == "cancelled"
    again = CliRunner().invoke(main, ["cancel", job_id])
    assert again.exit_code == 1 and error_lines(again.output) == [f"Error: job {job_id} already cancelled; "
                                                                   "nothing to cancel"]
    assert "requeued" in run("retry", job_id).output
    assert queue.get(job_id).state == "queued"
    not_failed = CliRunner().invoke(main, ["retry", job_id])
    assert not_failed.exit_code == 1 and "only failed or cancelled jobs can be retried" in not_failed.output
    for cmd in (["status", "j-nope000-0000"], ["cancel", "j-nope000-0000"], ["results", "j-nope000-0000"],
                ["logs", "j-nope000-0000"]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 1 and len(error_lines(res.output)) == 1, (cmd, res.output)
        assert "j-nope000-0000" in res.output
    no_result = CliRunner().invoke(main, ["results", job_id])
    assert no_result.exit_code == 1 and "has no results yet (state queued)" in no_result.output


def test_unreachable_redis_is_one_line_exit_1(env: dict[str, str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for cmd in (["list"], ["--redis-url", url, "status"], ["submit", "capsnet"]):
        res = CliRunner().invoke(main, cmd if cmd[0] == "--redis-url" else ["--redis-url", url, *cmd])
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: cannot reach Redis at {url}"), res.output
        assert "capsctl up" in lines[0] and "CAPSNET_REDIS_URL" in lines[0]


# ----------------------------------------------------------------------------- reading a finished job


def test_list_status_logs_results_of_a_driven_job(queue: JobQueue, tmp_path: Path) -> None:
    job_id = run("submit", "capsnet", "--epochs", "2", "--cpu-ranks", "2", "--name", "driven").output.strip()
    other = run("submit", "lenet5", "--priority", "low").output.strip()
    drive(queue, job_id)

    table = run("list").output
    header, *rows = table.strip().splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "KIND", "MODEL", "GPUS", "ATTEMPT", "PROGRESS", "AGE", "WORKER",
                              "TAGS"]
    assert rows[0].split()[:3] == [other, "-", "queued"]
    assert rows[1].split()[:7] == [job_id, "driven", "succeeded", "train", "capsnet", "0", "1/3"] and "w-test" in rows[1]
    listed = json.loads(run("list", "--json").output)
    assert [j["id"] for j in listed] == [other, job_id]
    assert set(listed[0]) >= {"id", "state", "kind", "model", "gpus", "cpus", "attempt", "max_attempts",
                              "progress", "progress_text", "created_at", "worker"}
    assert [j["id"] for j in json.loads(run("list", "--state", "queued", "--json").output)] == [other]
    bad_state = CliRunner().invoke(main, ["list", "--state", "nope"])
    assert bad_state.exit_code == 2 and "'nope' is not one of" in bad_state.output

    detail = run("status", job_id).output
    for text in ("succeeded", "capsnet", "CPU, 2 rank(s)", "attempt     1/3", "w-test", RESULT["checkpoint"],
                 "transitions:", "queued", "running"):
        assert text in detail, text
    rec = json.loads(run("status", job_id, "--json").output)
    assert rec["state"] == "succeeded" and rec["result"]["world_size"] == 2
    assert [t["state"] for t in rec["transitions"]] == ["queued", "running", "succeeded"]

    cluster = run("status").output
    assert "w-test" in cluster and "http://testhost:9310/metrics" in cluster and "queued 1" in cluster
    info = json.loads(run("status", "--json").output)
    assert info["cluster"]["workers"] == 1 and info["cluster"]["cpus"] == 4
    assert info["jobs"]["succeeded"] == 1 and info["jobs"]["queued"] == 1
    assert info["workers"][0]["id"] == "w-test"
    workers = json.loads(run("workers", "--json").output)
    assert workers["cluster"]["cpus"] == 4 and workers["workers"][0]["metrics_url"].endswith("/metrics")

    logs = run("logs", job_id).output
    assert "queued -> running" in logs and "loading mnist" in logs and "running -> succeeded" in logs
    assert "epoch     1/2" in logs and "epoch     2/2" in logs and "15°: 95.30%" in logs
    assert "step" not in logs.replace("steps", "")
    events = [json.loads(line) for line in run("logs", job_id, "--json").output.splitlines()]
    assert {e["type"] for e in events} == {"state", "log", "progress", "result"}
    assert all(set(e) == {"id", "type", "at", "data"} for e in events)
    followed = run("logs", job_id, "-f").output  # terminal: returns at once
    assert "running -> succeeded" in followed

    text = run("results", job_id).output
    assert "Accuracy by test rotation" in text and "98.10%" in text and "76.20%" in text
    assert "Per-class accuracy" in text and "Training curve" in text and "4950" in text
    assert f"Checkpoint: {RESULT['checkpoint']}" in text
    per_class = text.split("Per-class accuracy")[1].split("Training curve")[0].strip().splitlines()
    assert per_class[1].split() == ["class", "0°", "15°", "35°"] and len(per_class) == 12

    png = tmp_path / "plots" / "acc.png"
    res = json.loads(run("results", job_id, "--json", "--plot", str(png)).output)
    assert res["result"]["rotation_accuracy"]["35"] == 0.762 and res["checkpoint"] == RESULT["checkpoint"]
    assert res["plots"] == [str(png)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_results_matrix_and_heatmaps(queue: JobQueue, tmp_path: Path) -> None:
    job_id = run("tune", "--models", "capsnet,lenet5", "--angles", "0,30", "--epochs", "1").output.strip()
    claimed = queue.claim("w-tune", None)
    assert claimed is not None and claimed.job_id == job_id
    models = {m: {"rows": ["shift2", "shift2+rot30"], "cols": ["0", "30"],
                  "mean": [[0.99, 0.80], [0.98, 0.95]], "std": [[0.001, 0.02], [0.002, 0.01]],
                  "best_by_col": {"0": "shift2", "30": "shift2+rot30"},
                  "best_checkpoint": f"/ckpt/{m}.pt"} for m in ("capsnet", "lenet5")}
    assert queue.complete(job_id, claimed.token, {"kind": "tune", "models": models, "trials": [{}] * 4})
    text = run("results", job_id, "--plot", str(tmp_path / "heat.png")).output
    assert "capsnet: accuracy (%) mean ± std" in text and "lenet5:" in text
    assert "80.00 ± 2.00" in text and "95.00 ± 1.00 *" in text and "99.00 ± 0.10 *" in text
    assert "best checkpoint: /ckpt/capsnet.pt" in text and "trials 4" in text
    for model in ("capsnet", "lenet5"):
        assert (tmp_path / f"heat-{model}.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- --follow


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_submit_follow_prints_progress_and_reports_the_outcome(queue: JobQueue, outcome: str) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            deadline = time.monotonic() + 15
            while not queue.list() and time.monotonic() < deadline:
                time.sleep(0.05)
            drive(queue, queue.list()[0].id, fail="RuntimeError: out of memory" if outcome == "failed" else None)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    result = CliRunner().invoke(main, ["submit", "capsnet", "--epochs", "2", "--follow"])
    thread.join(10)
    assert not errors, errors
    lines = result.output.splitlines()
    assert lines[0].startswith("j-")
    # not a TTY: one line per epoch, no progress bar
    assert sum(" epoch 1/2" in line for line in lines) == 1 and sum(" epoch 2/2" in line for line in lines) == 1
    assert any("loss 0.3000" in line and "train acc 95.00%" in line and "4900 img/s" in line for line in lines)
    assert any("info      loading mnist" in line for line in lines)
    if outcome == "succeeded":
        assert result.exit_code == 0, result.output
        assert "Accuracy by test rotation" in result.output and "95.30%" in result.output
    else:
        assert result.exit_code == 1, result.output
        assert "failed: RuntimeError: out of memory" in result.output
        assert "Traceback" not in result.output


def test_dead_letters_and_stack_env_file(queue: JobQueue, env: dict[str, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    queue.client.lpush(queue.keys.dead_letters, json.dumps({"job_id": "j-bad", "reason": "invalid spec: x",
                                                            "at": time.time(), "source": "claim"}))
    assert "invalid spec: x" in run("dead-letters").output
    assert json.loads(run("dead-letters", "--json").output)[0]["job_id"] == "j-bad"

    # After `capsctl up`, <state_dir>/env points later invocations at the stack's Redis ...
    state = Path(env["CAPSNET_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "env").write_text(f"# test\nCAPSNET_REDIS_URL={env['CAPSNET_REDIS_URL']}\n")
    monkeypatch.delenv("CAPSNET_REDIS_URL")
    job_id = run("submit", "lenet5").output.strip()
    assert queue.get(job_id) is not None
    # ... while the real environment still wins over the file.
    monkeypatch.setenv("CAPSNET_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert CliRunner().invoke(main, ["list"]).exit_code == 1
    # auto env vars: CAPSCTL_<COMMAND>_<OPTION>
    monkeypatch.setenv("CAPSNET_REDIS_URL", env["CAPSNET_REDIS_URL"])
    monkeypatch.setenv("CAPSCTL_SUBMIT_EPOCHS", "4")
    assert json.loads(run("submit", "lenet5", "--json").output)["spec"]["epochs"] == 4


# ----------------------------------------------------------------------------- real subprocesses


def test_capsctl_subprocesses(queue: JobQueue, env: dict[str, str]) -> None:
    exe = Path(sys.executable).parent / "capsctl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "services.cli"]
    penv = {k: v for k, v in os.environ.items() if not k.startswith("CAPSCTL_") and k != "RAY_ADDRESS"}
    penv.update(env)

    def capsctl(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*cmd, *args], env=penv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        return proc

    bad = subprocess.Popen([*cmd, "submit", "lenet5", "--epochs", "0"], env=penv, cwd=REPO_ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job = json.loads(capsctl("submit", "lenet5", "--epochs", "1", "--eval-angles", "0,35", "--json").stdout)
    out, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and out == ""
    assert err.strip() == "Error: --epochs: must be an integer in 1..1000 (got 0)"
    assert queue.get(job["id"]).spec["eval_angles"] == [0.0, 35.0]
    listed = json.loads(capsctl("list", "--json").stdout)
    assert [(j["id"], j["state"]) for j in listed] == [(job["id"], "queued")]
    assert capsctl("cancel", job["id"]).stdout.strip() == f"cancelled {job['id']}"
    assert queue.get(job["id"]).state == "cancelled" and len(queue.list()) == 1


def test_submit_refuses_what_can_only_fail_later(queue: JobQueue, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_EVAL_ROOTS", "s3://bucket/")
    trained = run("submit", "lenet5", "--epochs", "1").output.strip()
    checkpoint = tmp_path / "artifacts" / "run" / "epoch-0001"  # inside the allowed artifact storage
    checkpoint.mkdir(parents=True)
    for source, expected in [("j-zzzzzzzz-zzzz", "source: no job j-zzzzzzzz-zzzz in Redis"),
                             (str(tmp_path / "artifacts" / "nowhere"),
                              "is neither a job id nor an existing checkpoint path"),
                             (f"file://{tmp_path}/artifacts/nowhere",
                              "is neither a job id nor an existing checkpoint path")]:
        res = CliRunner().invoke(main, ["eval", source])
        assert res.exit_code == 2 and "Traceback" not in res.output, (source, res.output)
        assert len(error_lines(res.output)) == 1 and expected in error_lines(res.output)[0], res.output
    assert len(queue.list()) == 1
    for source in (trained, str(checkpoint), f"file://{checkpoint}", "s3://bucket/run/epoch-0003"):
        assert run("eval", source).output.strip().startswith("j-")
    assert len(queue.list()) == 5

    # the same idempotency key with a different spec is an error naming the existing job
    first = run("submit", "capsnet", "--epochs", "2", "--idempotency-key", "nightly-7").output.strip()
    assert run("submit", "capsnet", "--epochs", "2", "--idempotency-key", "nightly-7").output.strip() == first
    clash = CliRunner().invoke(main, ["submit", "capsnet", "--epochs", "3", "--idempotency-key", "nightly-7"])
    assert clash.exit_code == 2 and len(error_lines(clash.output)) == 1, clash.output
    assert f"idempotency key 'nightly-7' already names job {first}, submitted with a different spec" in clash.output
    assert len(queue.list()) == 6 and queue.get(first).spec["epochs"] == 2


def test_submit_size_bounds_and_max_lost(queue: JobQueue) -> None:
    for args, expected in [(["--idempotency-key", "k" * 201], "--idempotency-key: at most 200 characters allowed"),
                           (["--name", "n" * 101], "name: at most 100 characters allowed (got 101)"),
                           (["--max-lost", "101"], "--max-lost: must be an integer in 0..100 (got 101)")]:
        res = CliRunner().invoke(main, ["submit", "capsnet", *args])
        assert res.exit_code == 2 and len(error_lines(res.output)) == 1, (args, res.output)
        assert expected in error_lines(res.output)[0], res.output
    assert queue.list() == []
    job = json.loads(run("submit", "lenet5", "--max-retries", "0", "--max-lost", "3", "--json").output)
    assert job["spec"]["max_lost"] == 3 and job["max_lost"] == 3
    assert json.loads(run("tune", "--max-lost", "5", "--json").output)["spec"]["max_lost"] == 5
    assert json.loads(run("eval", job["id"], "--max-lost", "0", "--json").output)["spec"]["max_lost"] == 0
    assert "0/3 lost workers" in run("status", job["id"]).output


def test_results_show_top_confusions_and_plot_a_confusion_matrix(queue: JobQueue, tmp_path: Path) -> None:
    upright = [[100 if t == p else 0 for p in range(10)] for t in range(10)]
    flipped = [row[:] for row in upright]
    flipped[6][6], flipped[6][9] = 29, 71   # upside down, most sixes read as nines
    flipped[9][9], flipped[9][6] = 40, 60
    broken = [[1, 2], "junk"]                # a malformed matrix in a stored result: dropped when read, no crash
    result = {**RESULT, "confusion": {"0": upright, "180": flipped, "35": broken}}
    job_id = run("submit", "lenet5").output.strip()
    drive(queue, job_id, result=result)

    text = run("results", job_id).output
    section = text.split("Top confusions")[1]
    assert "0°: no mistakes" in section
    assert "6→9 at 180°: 71 % of 6s (71 images); 9→6 at 180°: 60 % of 9s (60 images)" in section

    png = tmp_path / "acc.png"
    shown = json.loads(run("results", job_id, "--json", "--plot", str(png), "--confusion-angle", "180").output)
    figure = tmp_path / "acc-confusion-180.png"
    assert shown["plots"] == [str(png), str(figure)] and figure.read_bytes()[:4] == b"\x89PNG"
    missing = CliRunner().invoke(main, ["results", job_id, "--plot", str(png), "--confusion-angle", "45"])
    assert missing.exit_code == 1 and "no confusion matrix at 45° (it has: 0°, 180°)" in missing.output  # the garbled 35° one is dropped on read
    alone = CliRunner().invoke(main, ["results", job_id, "--confusion-angle", "180"])
    assert alone.exit_code == 2 and "--confusion-angle needs --plot" in alone.output


def test_models_lists_full_size_parameter_counts_without_building_them() -> None:
    from capsnet_core.models import MODEL_NAMES, build_model, count_parameters

    rows = json.loads(run("models", "--json").output)
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    assert {r["name"]: r["parameters"] for r in rows} == {n: count_parameters(build_model(n)) for n in MODEL_NAMES}


def test_logs_follow_exits_with_the_jobs_outcome(queue: JobQueue) -> None:
    failed = run("submit", "lenet5").output.strip()
    drive(queue, failed, fail="RuntimeError: out of memory")
    followed = CliRunner().invoke(main, ["logs", failed, "-f"])
    assert followed.exit_code == 1 and "running -> failed" in followed.output
    assert CliRunner().invoke(main, ["logs", failed]).exit_code == 0  # without -f: just the events
    succeeded = run("submit", "lenet5").output.strip()
    drive(queue, succeeded)
    assert CliRunner().invoke(main, ["logs", succeeded, "-f"]).exit_code == 0


def test_errors_name_what_the_user_typed(queue: JobQueue) -> None:
    typo = CliRunner().invoke(main, ["eval", "nosuchjob"])
    assert typo.exit_code == 2
    assert error_lines(typo.output) == ["Error: source: no job nosuchjob and no file or folder nosuchjob "
                                        "(see `capsctl list`)"]
    for command in (["cancel", "j-nope0000-0000"], ["retry", "j-nope0000-0000"]):
        missing = CliRunner().invoke(main, command)
        assert missing.exit_code == 1 and "(see `capsctl list`)" in missing.output, missing.output
    ranks = CliRunner().invoke(main, ["submit", "lenet5", "--cpu-ranks", "3", "--batch-size", "100"])
    assert error_lines(ranks.output)[0].startswith("Error: --batch-size: 100 does not divide over 3 ranks")
