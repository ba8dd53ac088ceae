"""Training ranks run at normal priority: the Ray node environment capsctl starts Ray with, and
the rank-side renice for clusters started without it (real processes and threads, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.config import RAY_NODE_ENV, ray_node_env


def test_ray_nodes_start_workers_at_normal_priority_unless_overridden() -> None:
    assert RAY_NODE_ENV == {"RAY_worker_niceness": "0"}
    assert ray_node_env({}) == {"RAY_worker_niceness": "0"}
    assert ray_node_env({"RAY_worker_niceness": "5", "OTHER": "x"}) == {"RAY_worker_niceness": "5"}


RENICE_SCRIPT = """
import json, os, threading, time
import psutil
from services.runs.train import set_process_niceness
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(3)]  # like gloo's and Ray's threads
for t in threads:
    t.start()
level = set_process_niceness(7)
nices = [os.getpriority(os.PRIO_PROCESS, t.id) for t in psutil.Process().threads()]
stop.set()
print(json.dumps({"level": level, "nices": nices}))
"""


def test_set_process_niceness_renices_every_thread() -> None:
    # On Linux the nice level is per thread: a plain os.nice() in the training thread would leave
    # the threads that already exist (gloo's, Ray's) where they were. Run in a child process so
    # the test process keeps its own priority.
    out = subprocess.run([sys.executable, "-c", RENICE_SCRIPT], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["level"] == 7
    assert len(result["nices"]) >= 4 and set(result["nices"]) == {7}


ADOPT_SCRIPT = """
import json, os, sys
from services.runs.train import adopt_worker_niceness
os.nice(int(sys.argv[1]))  # where Ray (or the operator) started this process
print(json.dumps({"level": adopt_worker_niceness(int(sys.argv[2])), "now": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


@pytest.mark.parametrize(("ray_level", "worker_level"), [(15, 0), (15, 5), (0, 9), (4, 4)])
def test_ranks_adopt_the_workers_nice_level(ray_level: int, worker_level: int) -> None:
    # A worker started with `nice -n 9` means its training too; one at 0 wants its ranks at 0, not
    # at Ray's 15. Lowering needs CAP_SYS_NICE (root here); raising never does.
    out = subprocess.run([sys.executable, "-c", ADOPT_SCRIPT, str(ray_level), str(worker_level)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    can_lower = os.geteuid() == 0
    expected = worker_level if worker_level >= ray_level or can_lower else ray_level
    assert result == {"level": expected, "now": expected}
