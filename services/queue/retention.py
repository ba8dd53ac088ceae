"""Retention: idle workers remove finished jobs older than ``CAPSNET_RETENTION_DAYS``.

Without it every finished job stays in Redis for good (about 7 KB each with its event
stream). ``Pruner.maybe_run`` is called from the worker's idle loop; it runs at most one
small ``JobQueue.prune`` batch per ``every_s`` seconds, so it never competes with claims, and
any number of workers may run it at once (each batch is one atomic Lua script). A backlog
left by a long pause is worked off at ``batch`` jobs per interval; ``capsctl prune`` removes
it on demand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.queue.jobqueue import JobQueue

log = logging.getLogger("capsctl.retention")


class Pruner:
    def __init__(self, queue: JobQueue, retention_days: float, *, every_s: float = 60.0, batch: int = 200,
                 clock: Callable[[], float] = time.monotonic,
                 wall_time: Callable[[], float | None] = lambda: None) -> None:
        # clock paces the batches; wall_time is the "now" ages are measured from (None: Redis' own time)
        self.queue = queue
        self.clock = clock
        self.wall_time = wall_time
        self.older_than = float(retention_days) * 86400.0
        self.every_s = float(every_s)
        self.batch = int(batch)
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.older_than > 0

    def maybe_run(self) -> int:
        """Prune one batch if retention is on and the interval is over; returns the jobs removed.
        Never raises: retention must not stop a worker from serving jobs."""
        now = self.clock()
        if not self.enabled or now < self._next:
            return 0
        try:
            batch = self.queue.prune(self.older_than, limit=self.batch, now=self.wall_time())
        except Exception as err:  # Redis away or a script error: try again next interval
            log.warning("retention: prune failed (%s: %s); retrying in %.0f s", type(err).__name__, err,
                        self.every_s)
            self._next = now + self.every_s
            return 0
        # a full batch means a backlog: come back soon rather than after a whole interval
        self._next = now + (min(self.every_s, 1.0) if batch.more else self.every_s)
        if batch.job_ids:
            log.info("retention: removed %d finished job(s) older than %g days", len(batch.job_ids),
                     self.older_than / 86400)
        return len(batch.job_ids)


__all__ = ["Pruner"]
