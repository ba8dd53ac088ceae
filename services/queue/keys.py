"""Every Redis key capsctl uses, built in one place from the prefix.

Layout (``P`` = prefix, default ``capsnet:``)::

    P job:<id>                          hash    the job record (see services.queue.jobqueue.JobRecord)
    P events:<id>                       stream  per-job events, capped (services.queue.events)
    P queue:<priority>:<gpus>:<cpus>    zset    queued job ids of one priority and resource shape,
                                                score = submit sequence number (FIFO)
    P shapes:<priority>                 set     "<gpus>:<cpus>" shapes with a non-empty queue
    P delayed                           zset    jobs in state retrying, score = not_before (s)
    P leases                            zset    running jobs, score = lease expiry (s)
    P state:<state>:<priority>          zset    index of jobs per (state, priority), score = entered (s)
    P jobs                              zset    every job, score = created_at (s)
    P idem:<sha256(key)[:32]>           string  idempotency key -> job id (with TTL)
    P dead                              list    dead letters, JSON, newest first (capped)
    P quarantine:<key>:<ms>             any     a queue key of the wrong type moved out of the way
    P workers                           zset    worker id -> expiry of its registration (s)
    P worker:<id>                       string  worker info JSON (with TTL)
    P counters                          hash    monotonic counters for metrics
    P notify                            list    wake-up tokens pushed by submit/requeue (BLPOP)
    P seq                               string  submit sequence counter
    P admission                         string  admission lock: token of the worker admitting a
                                                job (SET NX PX, services.worker.admission)

The Lua scripts of ``services.queue.jobqueue`` build the same keys from the same templates:
``Keys.lua_functions()`` generates their key helpers (``k_job(id)``, ``k_queue(p, g, c)`` ...)
from ``TEMPLATES``, so the layout is defined only here.

Scripts touch keys they compute at run time (job hashes found in a queue), so the queue needs
a single Redis node, or a Redis Cluster where every key shares one slot: use a hash-tagged
prefix such as ``{capsnet}:``.
"""

from __future__ import annotations

import hashlib

# name -> template relative to the prefix; each "{}" is one argument.
TEMPLATES: dict[str, str] = {
    "job": "job:{}",
    "events": "events:{}",
    "queue": "queue:{}:{}:{}",
    "shapes": "shapes:{}",
    "delayed": "delayed",
    "leases": "leases",
    "state": "state:{}:{}",
    "jobs": "jobs",
    "idem": "idem:{}",
    "dead": "dead",
    "quarantine": "quarantine:{}:{}",
    "workers": "workers",
    "worker": "worker:{}",
    "counters": "counters",
    "notify": "notify",
    "seq": "seq",
    "admission": "admission",
}


def _lua_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Keys:
    """Key builder for one prefix: ``Keys("capsnet:").job("j-1")`` -> ``"capsnet:job:j-1"``."""

    def __init__(self, prefix: str = "capsnet:") -> None:
        if not prefix:
            raise ValueError("redis key prefix must not be empty")
        self.prefix = prefix

    def _k(self, name: str, *args: object) -> str:
        return self.prefix + TEMPLATES[name].format(*args)

    # per job
    def job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def events(self, job_id: str) -> str:
        return self._k("events", job_id)

    # queues
    def queue(self, priority: str, gpus: int | float | str, cpus: int | str) -> str:
        return self._k("queue", priority, gpus, cpus)

    def shapes(self, priority: str) -> str:
        return self._k("shapes", priority)

    @property
    def delayed(self) -> str:
        return self._k("delayed")

    @property
    def leases(self) -> str:
        return self._k("leases")

    def state(self, state: str, priority: str) -> str:
        return self._k("state", state, priority)

    @property
    def jobs(self) -> str:
        return self._k("jobs")

    def idempotency(self, key: str) -> str:
        return self._k("idem", hashlib.sha256(key.encode()).hexdigest()[:32])

    @property
    def dead_letters(self) -> str:
        return self._k("dead")

    def quarantine(self, key: str, stamp: int | str) -> str:
        return self._k("quarantine", key, stamp)

    # workers and metrics
    @property
    def workers(self) -> str:
        return self._k("workers")

    def worker(self, worker_id: str) -> str:
        return self._k("worker", worker_id)

    @property
    def counters(self) -> str:
        return self._k("counters")

    @property
    def notify(self) -> str:
        return self._k("notify")

    @property
    def seq(self) -> str:
        return self._k("seq")

    @property
    def admission(self) -> str:
        return self._k("admission")

    def all_pattern(self) -> str:
        """A SCAN pattern matching every key under this prefix (for tests and cleanup)."""
        return self.prefix.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?") + "*"

    @staticmethod
    def lua_functions(prefix_var: str = "P") -> str:
        """Lua ``local function k_<name>(...)`` helpers mirroring this class, for the queue scripts.

        The prefix is read from the Lua variable ``prefix_var`` (set from ARGV at run time).
        """
        lines = []
        for name, template in TEMPLATES.items():
            parts = template.split("{}")
            params = [f"a{i}" for i in range(len(parts) - 1)]
            expr = [prefix_var]
            for i, literal in enumerate(parts):
                if literal:
                    expr.append(_lua_quote(literal))
                if i < len(params):
                    expr.append(f"tostring({params[i]})")
            lines.append(f"local function k_{name}({', '.join(params)}) return {' .. '.join(expr)} end")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"


__all__ = ["TEMPLATES", "Keys"]
