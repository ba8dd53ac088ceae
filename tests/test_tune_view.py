"""A tune job as a user watches it: `capsctl tune --follow`, `logs` and `results`, on a real stack
(a private Redis, a local Ray, a `capsctl worker` subprocess) running a real two-trial ASHA study."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import main
from services.cli.tune_view import TrialBoard, TuneProgressView, trial_line

from .service_helpers import WorkerProcess, service_env

# Grid order with one trial at a time: the good lr reaches ASHA's first rung before the hopeless one,
# so the hopeless one is measured against it at epoch 1 and stopped there.
TUNE_ARGS = ["tune", "--models", "lenet5", "--angles", "0", "--eval-angles", "0,30", "--lr", "3e-3,1e-6",
             "--epochs", "3", "--batch-size", "64", "--train-subset", "1500", "--test-subset", "300",
             "--max-concurrent", "1", "--name", "watch-me"]


@pytest.fixture(scope="module")
def stack(redis_server: str, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Redis db 3 (the per-test fixtures flush db 0), one worker; the CLI's environment."""
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/3"
    redis.Redis.from_url(url).flushdb()
    tmp = tmp_path_factory.mktemp("tune-view")
    env = service_env(url, ray_cluster, tmp / "artifacts")
    worker = WorkerProcess("w-view", env, tmp / "worker.log")
    cli_env = {"CAPSNET_REDIS_URL": url, "CAPSNET_STATE_DIR": str(tmp / "state"),
               "CAPSNET_ARTIFACTS": str(tmp / "artifacts")}
    try:
        yield {"env": cli_env, "worker": worker, "tmp": tmp}
    finally:
        worker.stop()
        redis.Redis.from_url(url).flushdb()


def cli(stack: dict, *args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), env=stack["env"], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def followed(stack: dict) -> dict:
    """`capsctl tune ... --follow`: what it printed (not a terminal) and the job's id."""
    started = time.monotonic()
    out = cli(stack, *TUNE_ARGS, "--follow").output
    return {"output": out, "job": out.splitlines()[0].strip(), "seconds": time.monotonic() - started}


def test_trial_lines_in_words() -> None:
    """The wording of every trial status (the end-to-end tests below see the real events)."""
    base = {"type": "trial", "trial": "t003-lenet5-shift2+rot15-lr0.001-s1", "model": "lenet5",
            "augment": "shift2+rot15", "lr": 1e-3, "routing_iters": None, "seed": 1}
    assert trial_line({**base, "status": "running", "epoch": 1, "epochs": 2, "val_accuracy": 0.775}) == \
        "trial t003 lenet5 shift2+rot15 seed 1: epoch 1/2, val 77.5 %"
    assert trial_line({**base, "status": "finished", "rotation_accuracy": {"35": 0.505, "0": 0.89, "15": 0.824}}) \
        == "trial t003 lenet5 shift2+rot15 seed 1: finished: 0° 89.0 %, 15° 82.4 %, 35° 50.5 %"
    assert trial_line({**base, "status": "early_stopped", "epoch": 1, "epochs": 3}).endswith(
        ": stopped early by ASHA after epoch 1/3")
    board = TrialBoard(total=3)
    for status in ("started", "running"):
        board.observe({"type": "progress", "data": {**base, "status": status, "val_accuracy": 0.5}})
    assert board.summary() == "trials: 0 finished, 1 running, 2 pending, 0 stopped (of 3); best val 50.0 % (t003)"
    assert board.observe({"type": "progress", "data": {**base, "status": "finished"}})
    assert board.observe({"type": "progress", "data": "junk"}) is False
    assert board.summary().startswith("trials: 1 finished, 0 running, 2 pending, 0 stopped (of 3)")


@pytest.mark.slow
def test_tune_follow_reads_in_words_with_a_running_summary(stack: dict, followed: dict) -> None:
    out = followed["output"]
    print(out)
    assert "progress  {" not in out and '"status"' not in out  # no raw JSON events any more
    assert "trial t000 lenet5 shift2 lr 0.003 seed 0: started" in out
    assert "trial t000 lenet5 shift2 lr 0.003 seed 0: epoch 1/3, val " in out
    assert "trial t000 lenet5 shift2 lr 0.003 seed 0: finished: 0° " in out and ", 30° " in out
    assert "trial t001 lenet5 shift2 lr 1e-06 seed 0: stopped early by ASHA after epoch 1/3 (val " in out
    # Not a terminal: plain summary lines, one per trial that ended, never a carriage return.
    summaries = [line for line in out.splitlines() if "] trials: " in line]
    assert [s.split("] ", 1)[1].split(";")[0] for s in summaries] == [
        "trials: 1 finished, 0 running, 1 pending, 0 stopped (of 2)",
        "trials: 1 finished, 0 running, 0 pending, 1 stopped (of 2)"]
    assert "\r" not in out and "\x1b" not in out
    # The results after it: the matrix, and no line that belongs to train jobs.
    assert "lenet5: accuracy (%) mean ± std" in out and "best checkpoint:" in out
    assert "Checkpoint:" not in out


@pytest.mark.slow
def test_logs_of_a_tune_job_in_words_json_raw_and_in_place_on_a_terminal(stack: dict, followed: dict) -> None:
    job = followed["job"]
    logs = cli(stack, "logs", job).output
    assert "trial t001 lenet5 shift2 lr 1e-06 seed 0: stopped early by ASHA" in logs
    assert "trials: 1 finished, 0 running, 0 pending, 1 stopped (of 2)" in logs
    raw = [json.loads(line) for line in cli(stack, "logs", job, "--json").output.splitlines()]
    statuses = [e["data"]["status"] for e in raw if e["type"] == "progress" and e["data"].get("type") == "trial"]
    assert statuses.count("started") == 2 and "early_stopped" in statuses and "finished" in statuses
    # On a terminal the summary is one line rewritten in place (carriage return + erase line).
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "logs", "-f", job], stdout=secondary,
                          stderr=subprocess.PIPE, env={**os.environ, **stack["env"]}, timeout=60)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    screen = b"".join(chunks).decode()
    assert proc.returncode == 0, proc.stderr
    assert screen.count("\r\x1b[K") >= 4 and "\r\x1b[Ktrials: 1 finished, 0 running, 0 pending, 1 stopped" in screen
    assert screen.rstrip().splitlines()[-1].endswith("(t000)")  # the last summary stays on screen


@pytest.mark.slow
def test_results_of_a_tune_job_and_a_quiet_worker_log(stack: dict, followed: dict) -> None:
    text = cli(stack, "results", followed["job"]).output
    assert "lenet5: accuracy (%) mean ± std" in text and "Matrix CSV: " in text
    assert "Checkpoint:" not in text
    log = stack["worker"].output()
    for banner in ("Configuration for experiment", "View detailed results here", "Trial status:",
                   "Search algorithm", "╭", "│"):
        assert banner not in log, (banner, log[-3000:])
    assert Path(stack["worker"].log_path).stat().st_size < 20_000, log[-3000:]


def test_view_survives_junk_events_and_draws_the_summary_in_place_only_on_a_terminal() -> None:
    junk = [{"type": "progress", "at": "x", "data": {"type": "trial", "trial": None, "status": 3}},
            {"type": "progress", "at": 0, "data": {"type": "trial", "trial": "weird", "status": "running",
                                                   "val_accuracy": "nan?", "epoch": [1]}},
            {"type": "progress", "data": ["not", "a", "dict"]},
            {"type": "log", "data": {"message": "tune: 2 trials", "trials": 2}},
            {"type": "progress", "data": {"type": "trial", "trial": "t001-x", "status": "finished",
                                          "rotation_accuracy": {"0": "high"}}}]
    for tty in (False, True):
        written: list[str] = []
        view = TuneProgressView(written.append, tty=tty, describe=lambda e: f"other {e.get('type')}",
                                stamp=lambda _at: "")
        for event in junk:
            view.handle(event)
        view.close()
        text = "".join(written)
        assert "trial weird: epoch [1]/?, val -" in text and "trial t001: finished: 0° -" in text
        assert "trials: 1 finished, 1 running, 0 pending, 0 stopped (of 2)" in text
        assert ("\r\x1b[K" in text) is tty and text.endswith("\n")
