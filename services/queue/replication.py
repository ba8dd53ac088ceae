"""Waiting for replicas before an acknowledgement (``WAIT``). Guarantees and limits:
docs/architecture.md, README "Deployment"."""

from __future__ import annotations

from typing import Any

import redis


class NotReplicated(redis.exceptions.RedisError):
    """The primary took the write but fewer than the required replicas confirmed it within the
    timeout. The write stands on the primary; a failover now could lose it. Transient: the
    caller retries (outcome scripts replay idempotently under their lease token)."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int, reply: Any = None) -> None:
        super().__init__(f"not yet replicated: {acked} of {wanted} replica(s) confirmed within {timeout_ms} ms")
        self.acked, self.wanted, self.reply = acked, wanted, reply


def run_replicated(client: redis.Redis, replicas: int, timeout_ms: int, queue_write: Any) -> Any:
    """Run the write ``queue_write(pipe)`` puts on a pipeline, then ``WAIT replicas timeout_ms`` on the
    same connection; its reply, or ``NotReplicated`` (carrying the reply) when too few replicas confirmed."""
    pipe = client.pipeline(transaction=False)
    queue_write(pipe)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    *replies, acked = pipe.execute(raise_on_error=False)
    for failed in replies:
        if isinstance(failed, Exception):
            raise failed  # the write's own error (READONLY during a failover, a script's error...)
    if isinstance(acked, Exception):
        if "replica" in str(acked).lower():
            # This connection reached a replica (a failover under way): ask the Sentinels again.
            client.connection_pool.disconnect()
            raise redis.exceptions.ReadOnlyError(f"READONLY {acked}")
        raise acked
    reply = replies[0] if len(replies) == 1 else replies
    if int(acked) < replicas:
        raise NotReplicated(int(acked), replicas, timeout_ms, reply)
    return reply
