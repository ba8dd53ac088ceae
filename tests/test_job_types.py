"""The typed values that flow through the service: job states and the runner table."""

from __future__ import annotations

import typing

import pytest

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
