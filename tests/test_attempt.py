"""A rank's handle on its attempt (services.queue.attempt): the Ray nodes its ranks record are a
structured, fenced field, one attempt's at a time."""

from __future__ import annotations

import pytest

from services.queue.attempt import AttemptWriter
from services.queue.jobqueue import JobQueue
from services.queue.keys import Keys

from .queue_helpers import CPU, train


@pytest.fixture
def q(client) -> JobQueue:
    return JobQueue(client, Keys("t:"), lease_seconds=5, backoff_base=0.1, backoff_max=0.1)


def test_rank_nodes_are_fenced_and_per_attempt(q: JobQueue) -> None:
    job = q.submit(train(max_lost=3))
    first = q.claim("w1", CPU)
    attempt = AttemptWriter(q.client, q.keys)
    assert attempt.rank_nodes(job.id, first.token) == set()
    assert attempt.add_rank_node(job.id, first.token, "node-a")
    assert attempt.add_rank_node(job.id, first.token, "node-b")
    assert attempt.add_rank_node(job.id, first.token, "node-a")  # a second rank on node-a
    assert attempt.rank_nodes(job.id, first.token) == {"node-a", "node-b"}
    assert not attempt.add_rank_node(job.id, "stale-token", "node-x")  # fenced out
    assert q.hand_back(job.id, first.token, "node lost")
    second = q.claim("w2", CPU)
    assert attempt.rank_nodes(job.id, second.token) == set()  # the earlier attempt's nodes are not this one's
    assert attempt.add_rank_node(job.id, second.token, "node-c")
    assert attempt.rank_nodes(job.id, second.token) == {"node-c"}
    assert attempt.rank_nodes(job.id, first.token) == set()
    q.client.hset(q.keys.job(job.id), "rank_nodes", "{not json")  # junk reads as none, and is replaced
    assert attempt.rank_nodes(job.id, second.token) == set()
    assert attempt.add_rank_node(job.id, second.token, "node-d")
    assert attempt.rank_nodes(job.id, second.token) == {"node-d"}
