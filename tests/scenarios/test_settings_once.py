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

from ..service_helpers import service_env, wait_until

# A worker whose Settings carry an override the environment does not (as CLI flags and
# <state_dir>/env give it): before, the run re-read the environment and trained the model anyway.
OVERRIDE_WORKER = ("import logging, sys; logging.basicConfig(level=logging.INFO);"
                   "from services.config import Settings; from services.worker.worker import Worker;"
                   "Worker(Settings.from_env(max_params=1_000_000, artifacts=sys.argv[2]), worker_id=sys.argv[1])"
                   ".run(max_jobs=1)")


@pytest.mark.slow
def test_a_worker_run_sees_the_worker_settings_not_the_environment(queue: JobQueue, redis_url: str,
                                                                   ray_cluster: str, tmp_path: Path) -> None:
    env = service_env(redis_url, ray_cluster, tmp_path / "env-artifacts")
    env.pop("CAPSNET_MAX_PARAMS", None)  # the environment allows the default 100 M parameters
    artifacts = tmp_path / "worker-artifacts"
    # Written straight into Redis: no submit-time check; the worker's run must refuse it.
    job = queue.submit({"kind": "train", "model": "capsnet", "epochs": 1, "train_subset": 200, "test_subset": 100,
                        "eval_angles": [0], "max_retries": 0})
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", OVERRIDE_WORKER, "w-settings", str(artifacts)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            record = wait_until(lambda: (r := queue.get(job.id)) and r.is_terminal and r, 120,
                                what=f"job {job.id} to end; log:\n{log_path.read_text()[-3000:]}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
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
