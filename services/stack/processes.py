"""Process supervision for ``capsctl up``/``down`` (services.stack.stack): spawning detached
processes, telling whether a recorded PID is still ours, finding a session's processes and
stopping them (SIGTERM, grace, SIGKILL), and free TCP ports.

Every check goes through psutil, which compares a process's create time, so a PID the OS has
since handed to another program is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def running(proc: psutil.Process) -> bool:
    """True while ``proc`` runs; zombies count as gone, and a PID reused by another program is
    not ``proc`` (psutil compares the create time)."""
    try:
        return proc.is_running() and proc.status() not in _GONE
    except psutil.Error:
        return False


def find_process(pid: int | None, needle: str | None = None) -> psutil.Process | None:
    """The running process ``pid`` whose command line contains ``needle`` (when given), else None."""
    if not pid or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    try:
        if proc.status() in _GONE:
            return None
        if needle is not None and needle not in " ".join(proc.cmdline()):
            return None
    except psutil.AccessDenied:  # someone else's process: alive, but never ours to match
        return proc if needle is None else None
    except psutil.Error:
        return None
    return proc


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """True while ``pid`` runs (zombies count as gone) and, with ``needle``, its command line
    still contains it (so a PID the OS handed to another program is not ours)."""
    return find_process(pid, needle) is not None


def session_procs(sid: int | None) -> list[psutil.Process]:
    if not sid:
        return []
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() not in _GONE:
                out.append(proc)
        except (psutil.Error, OSError):  # gone meanwhile
            continue
    return sorted(out, key=lambda p: p.pid)


def session_pids(sid: int | None) -> list[int]:
    """Live processes whose session id is ``sid``."""
    return [p.pid for p in session_procs(sid)]


def terminate(procs: list[psutil.Process], grace: float) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, SIGKILL what is left; returns the PIDs signalled. psutil
    refuses to signal a PID that now belongs to another process, so a late reuse is never hit."""
    targets = [p for p in procs if running(p)]
    for proc in targets:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(running(p) for p in targets):
        time.sleep(0.1)
    for proc in targets:
        if running(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(running(p) for p in targets):
        time.sleep(0.05)
    return [p.pid for p in targets]


def log_tail(path: Path | str | None, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_fh:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)


# ----------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def stop_ray_session(sid: int, grace: float) -> list[int]:
    """Stop the Ray processes of one session in ``ray stop``'s order: the raylet first (its
    agents fate-share with it), then the rest, the GCS last; a third of the grace period each."""

    def name(proc: psutil.Process) -> str:
        try:
            return proc.name()
        except psutil.Error:
            return ""

    buckets: list[Callable[[str], bool]] = [lambda c: c == "raylet",
                                            lambda c: c not in ("raylet", "gcs_server"),
                                            lambda c: c == "gcs_server"]
    stopped: list[int] = []
    for pick in buckets:
        procs = [p for p in session_procs(sid) if pick(name(p))]
        if procs:
            stopped += terminate(procs, grace / len(buckets))
    late = session_procs(sid)  # anything spawned while the others were stopping
    if late:
        stopped += terminate(late, 1.0)
    return stopped


__all__ = ["find_process", "free_port", "log_tail", "pid_alive", "port_free", "running", "session_pids",
           "session_procs", "spawn", "stop_ray_session", "terminate"]
