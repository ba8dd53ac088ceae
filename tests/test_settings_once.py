"""A run sees the worker's own Settings (its command line, ``<state_dir>/env``), not a fresh
read of the environment; artifact URIs keep their ``//`` from settings to the job's eval check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.artifacts import is_uri, join, normalize
from services.cli import main
from services.config import Settings
from services.queue.jobqueue import JobQueue

from .service_helpers import service_env, wait_until


@pytest.mark.slow
def test_a_worker_run_sees_the_max_params_of_its_state_dir_env(queue: JobQueue, redis_url: str, ray_cluster: str,
                                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "env").write_text("CAPSNET_MAX_PARAMS=1000000\n")  # only here: not in the environment
    env = service_env(redis_url, ray_cluster, tmp_path / "unused")
    for key in ("CAPSNET_ARTIFACTS", "CAPSNET_MAX_PARAMS", "CAPSNET_STATE_DIR"):
        env.pop(key, None)
    artifacts = tmp_path / "from-the-command-line"
    # Written straight into Redis: no submit-time check; the worker's run must refuse it.
    job = queue.submit({"kind": "train", "model": "capsnet", "epochs": 1, "train_subset": 200, "test_subset": 100,
                        "eval_angles": [0], "max_retries": 0})
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "--state-dir", str(state), "--artifacts",
                             str(artifacts), "worker", "--worker-id", "w-settings", "--max-jobs", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 120,
                            what=f"job {job.id} to end; log:\n{(tmp_path / 'worker.log').read_text()[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert record.state == "failed", record.state
    assert "above the limit of 1,000,000" in (record.error or ""), record.error


def test_an_s3_uri_keeps_its_slashes_through_settings_and_the_eval_check(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path, redis_url: str) -> None:
    uri = "s3://bucket/runs"
    assert Settings.from_env({"CAPSNET_ARTIFACTS": uri}).artifacts == uri
    assert Settings.from_env({}, artifacts=uri + "/").artifacts == uri
    assert join(uri, "J", "epoch-0001") == "s3://bucket/runs/J/epoch-0001"
    assert is_uri(uri) and is_uri("s3:/bucket/runs") and not is_uri(f"file://{tmp_path}")
    assert normalize("~/x") == str(Path.home() / "x")  # local paths: as before, expanded and absolute
    # capsctl eval accepts a checkpoint under the URI artifact store, and the job keeps it verbatim.
    monkeypatch.setenv("CAPSNET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CAPSNET_EVAL_ROOTS", raising=False)
    source = f"{uri}/job-1/epoch-0002"
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "--artifacts", uri, "eval", source, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["spec"]["source"] == source
    outside = CliRunner().invoke(main, ["--redis-url", redis_url, "--artifacts", uri, "eval", "s3://other/c"])
    assert outside.exit_code == 2 and "outside the allowed eval sources (s3://bucket/runs)" in outside.output
