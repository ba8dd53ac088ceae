"""Which failures of a Ray run are an infrastructure loss (``AttemptLost``: requeued, charged
to the job's ``max_lost``) rather than the job's own error (charged to ``max_retries``).

Train jobs: ``infrastructure_loss`` on what ``trainer.fit()`` raised, and ``node_loss`` for a
rank failure that reached the driver before Ray noticed the dead node. Tune jobs: ``trial_loss``
on each trial's error as Tune's result grid reports it.
"""

from __future__ import annotations

import time

# How long a failed attempt whose ranks ran on several Ray nodes waits for Ray to declare one of
# those nodes dead before the failure counts as the job's own: a surviving rank's collective error
# (gloo/NCCL peer gone, timeout) reaches the driver within a second, but Ray's GCS declares a
# killed node dead only after its health checks fail (3 s period x 5 failures by default, plus
# the 10 s timeout of the last one).
NODE_DEATH_GRACE_S = 30.0


def process_gone(error: BaseException | None) -> bool:
    """Is ``error`` Ray saying a process (actor, worker) or its node is gone, as opposed to an
    exception some code raised? An actor whose ``__init__`` raised is code, not infrastructure."""
    from ray.exceptions import (
        LocalRayletDiedError,
        NodeDiedError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )

    if error is None or isinstance(error, RayTaskError):  # code that ran raised it (maybe re-raising)
        return False
    if isinstance(error, RayActorError):
        return not error.actor_init_failed
    return isinstance(error, NodeDiedError | WorkerCrashedError | LocalRayletDiedError)


def infrastructure_loss(exc: BaseException) -> str | None:
    """Why what ``trainer.fit()`` raised is an infrastructure loss, or None when it is the job's
    own error (an exception raised by the training function, a bad spec...).

    Ray Train V2 reports every rank failure as a ``WorkerGroupError`` and charges all of them to
    ``FailureConfig.max_failures``; its ``worker_failures`` tells them apart. A rank whose process
    (or node) is gone fails Ray's health check of it: ``WorkerHealthCheckFailedError`` wrapping a
    ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``) or ``NodeDiedError`` /
    ``WorkerCrashedError`` / ``LocalRayletDiedError``, or ``WorkerHealthCheckTimeoutError`` when
    the process stopped answering (a partitioned node). An exception raised by the training
    function reaches us unwrapped, so a user's own ``ActorDiedError`` stays the job's error. As in
    Ray's own preemption policy, one dead rank makes the whole failure a loss: the surviving ranks
    routinely fail with collateral errors (collective aborted, connection reset by the dead peer).
    The controller's start-up failures (a rank's node died while the group started, or its
    resources vanished) are losses too. A job that kills its own rank processes every time is
    bounded by ``max_lost``. (When the surviving rank's error arrives before Ray noticed the dead
    one, see ``node_loss``.)
    """
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
        WorkerHealthCheckFailedError,
        WorkerHealthCheckTimeoutError,
    )
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError):
        dead = sorted(rank for rank, error in exc.worker_failures.items()
                      if isinstance(error, WorkerHealthCheckTimeoutError)
                      or (isinstance(error, WorkerHealthCheckFailedError) and process_gone(error.health_check_failure)))
        if not dead:
            return None
        first = exc.worker_failures[dead[0]]
        cause = getattr(first, "health_check_failure", first)
        return f"rank(s) {', '.join(map(str, dead))} lost their Ray process or node ({describe_error(cause)})"
    if isinstance(exc, ControllerError) and isinstance(
            exc.controller_failure, WorkerGroupStartupFailedError | WorkerGroupStartupTimeoutError):
        return f"Ray Train could not start the ranks: {str(exc.controller_failure).splitlines()[0][:200]}"
    if process_gone(exc):  # the controller actor itself (on the driver's node) is gone
        return f"Ray Train's controller was lost ({type(exc).__name__})"
    return None


def describe_error(error: BaseException) -> str:
    """``Type: last line of the message`` (Ray's messages end with the useful line), short."""
    detail = str(error).strip().splitlines()
    return f"{type(error).__name__}{': ' + detail[-1][:200] if detail else ''}"


def dead_nodes(node_ids: set[str]) -> list[str]:
    """Those of ``node_ids`` that Ray's GCS has declared dead (an id it does not know is not dead)."""
    import ray

    alive = {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}
    return sorted(n for n in node_ids if alive.get(n) is False)


def node_loss(exc: BaseException, node_ids: set[str], grace_s: float = NODE_DEATH_GRACE_S) -> str | None:
    """Why a rank failure that ``infrastructure_loss`` took for the job's own is a loss after all:
    one of the Ray nodes the attempt's ranks ran on is dead. With ranks split over two nodes, the
    surviving rank's collective error (gloo/NCCL peer gone, a timeout) can reach the driver before
    Ray's health check of the dead rank fails, so for a multi-node attempt wait up to ``grace_s``
    for Ray to declare one of the nodes dead. Only rank failures qualify: a bad config is never a
    node's fault."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    if not node_ids or not isinstance(exc, WorkerGroupError):
        return None
    deadline = time.monotonic() + (grace_s if len(node_ids) > 1 else 0.0)
    while True:
        dead = dead_nodes(node_ids)
        if dead:
            first = next(iter(exc.worker_failures.values()), None)
            return (f"Ray node(s) {', '.join(n[:8] for n in dead)} of the attempt's ranks died"
                    + (f" (a rank reported {describe_error(first)})" if first is not None else ""))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)

def trial_loss(error: BaseException | str | None) -> str | None:
    """Why a trial's error (as Tune's result grid reports it) is an infrastructure loss, or None
    when it is the trial's own error.

    Tune records what failed the trial's actor task: a ``RayTaskError`` when the trainable raised
    (an instance of the cause's class too, so a user's own ``ActorDiedError`` is one), a bare
    ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``) when the trial's actor is
    gone, e.g. with its node; without a picklable error, only its text. A trial that drives its
    own Ray Train run (``gpus_per_trial > 1``) raised that run's ``WorkerGroupError`` /
    ``ControllerError``: a loss when its ranks were (see ``infrastructure_loss``)."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if not isinstance(error, BaseException):
        return None
    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        return infrastructure_loss(cause) if isinstance(cause, WorkerGroupError | ControllerError) else None
    return describe_error(error) if process_gone(error) else None
