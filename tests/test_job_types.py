"""The typed values that flow through the service: job states and the runner table."""

from __future__ import annotations

import time
import typing

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from services.cli import main
from services.metrics.worker import WorkerMetrics
from services.queue.causes import FailureCause
from services.queue.job import AnySpec
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys
from services.queue.states import JobState
from services.worker.runners import RUNNERS, runner_for

from .queue_helpers import CPU, train


@pytest.fixture
def q(client):
    return JobQueue(client, Keys("types:"), lease_seconds=5, backoff_base=0.2, backoff_max=0.3)


def test_job_states_are_the_strings_redis_stores(q, client):
    rec = q.submit(train(name="typed"))
    assert JobState.parse(rec.state) is JobState.QUEUED and not q.get(rec.id).is_terminal
    job = q.claim("w1", CPU)
    assert JobState.parse(q.get(rec.id).state) is JobState.RUNNING
    assert q.complete(job.id, job.token, {"accuracy": {"0": 0.9}})
    stored = q.get(rec.id)
    assert stored.state == JobState.SUCCEEDED and stored.is_terminal
    # the Lua scripts wrote the plain string; the enum compares equal to it
    assert client.hget(Keys("types:").job(rec.id), "state") == "succeeded"
    assert [s for s in JobState if s.is_terminal] == [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
    assert JobState.parse("junk") is None and JobState.parse(None) is None


def test_every_spec_kind_has_one_runner():
    kinds = {cls.model_fields["kind"].default for cls in typing.get_args(AnySpec)}
    assert kinds == set(RUNNERS) == {"train", "eval", "tune"}
    with pytest.raises(ValueError, match="unknown job kind 'nope'"):
        runner_for("nope")


def test_failed_and_lost_attempts_record_their_cause(q):
    rec = q.submit(train(name="causes", max_retries=1))
    job = q.claim("w1", CPU)
    assert q.hand_back(job.id, job.token, "node died") == "queued"
    lost = q.get(rec.id)
    assert FailureCause.parse(lost.cause) is FailureCause.INFRASTRUCTURE_LOSS
    assert lost.transitions[-1]["cause"] == "infrastructure_loss"

    job = q.claim("w1", CPU)
    assert q.fail(job.id, job.token, "boom", cause=FailureCause.UNKNOWN)
    assert q.get(rec.id).transitions[-1]["state"] == "retrying"
    assert q.get(rec.id).transitions[-1]["cause"] == "unknown"

    time.sleep(0.4)  # the retry backoff (0.2 s)
    job = q.claim("w1", CPU)
    assert job is not None
    assert q.fail(job.id, job.token, "bad input", retry=False, cause=FailureCause.USER_ERROR)
    failed = q.get(rec.id)
    assert failed.state == JobState.FAILED and failed.cause == "user_error"
    assert failed.transitions[-1]["cause"] == "user_error"

    assert q.retry(rec.id).state == JobState.QUEUED
    assert q.get(rec.id).cause is None  # a manual retry starts clean, like the error


def test_status_shows_the_cause(q, redis_url, tmp_path):
    rec = q.submit(train(name="shown"))
    job = q.claim("w1", CPU)
    q.fail(job.id, job.token, "disk full", retry=False, cause=FailureCause.STORAGE)
    env = {"CAPSNET_REDIS_URL": redis_url, "CAPSNET_REDIS_PREFIX": "types:",
           "CAPSNET_STATE_DIR": str(tmp_path / "state"), "CAPSNET_ARTIFACTS": str(tmp_path / "artifacts")}
    out = CliRunner().invoke(main, ["status", rec.id], env=env)
    assert out.exit_code == 0, out.output
    assert any(line.split() == ["cause", "storage"] for line in out.output.splitlines())


def test_failures_counter_has_bounded_cause_labels():
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry=registry)
    metrics.count_failure("train", FailureCause.TIME_LIMIT)
    metrics.count_failure("train", "not-a-cause")
    value = registry.get_sample_value
    assert value("capsnet_job_failures_total", {"kind": "train", "cause": "time_limit"}) == 1
    assert value("capsnet_job_failures_total", {"kind": "train", "cause": "unknown"}) == 1
    assert value("capsnet_job_failures_total", {"kind": "eval", "cause": "storage"}) == 0
    causes = {s.labels["cause"] for m in registry.collect() if m.name == "capsnet_job_failures" for s in m.samples}
    assert causes == {c.value for c in FailureCause}


def test_models_declare_reconstructions_through_their_config():
    from capsnet_core.models import model_reconstructs

    assert model_reconstructs("capsnet") and model_reconstructs("capsnet", decoder_hidden=[8, 16])
    assert not model_reconstructs("capsnet", decoder=False)
    # only CapsNet's reconstructions are plotted, as before: EffCaps' optional decoder is not
    assert not model_reconstructs("effcaps", decoder=True) and not model_reconstructs("lenet5")
