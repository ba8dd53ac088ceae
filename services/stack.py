"""``capsctl up`` / ``capsctl down``: the embedded single-machine stack (a local redis-server, a
Ray head and N workers, recorded in ``<state_dir>/stack.json``; see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import psutil
import redis

from .config import Settings, ray_node_env, redis_client
from .queue import JobQueue

STACK_FILE = "stack.json"
ENV_FILE = "env"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")
ENV_KEYS = ("CAPSNET_REDIS_URL", "CAPSNET_REDIS_PREFIX", "RAY_ADDRESS", "RAY_AUTH_MODE")

Log = Callable[[str], None]


class StackError(RuntimeError):
    """``up``/``down`` could not do its job; the message is one line (plus a log tail at most)."""


# ----------------------------------------------------------------------------- files


def stack_path(state_dir: Path) -> Path:
    return Path(state_dir) / STACK_FILE


def env_path(state_dir: Path) -> Path:
    return Path(state_dir) / ENV_FILE


def read_stack(state_dir: Path) -> dict[str, Any] | None:
    """The record ``up`` wrote, or None (no stack, or an unreadable file)."""
    try:
        data = json.loads(stack_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_env(state_dir: Path) -> dict[str, str]:
    """``KEY=value`` pairs from ``<state_dir>/env`` (empty when there is none)."""
    try:
        text = env_path(state_dir).read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in ENV_KEYS:
            out[key] = value
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(state_dir: Path, record: dict[str, Any]) -> None:
    _atomic_write(stack_path(state_dir), json.dumps(record, indent=2, sort_keys=True) + "\n")


def _write_env(state_dir: Path, env: dict[str, str]) -> None:
    lines = ["# written by `capsctl up`, removed by `capsctl down`; capsctl reads it for settings",
             "# the environment leaves unset. Other tools: set -a; . " + str(env_path(state_dir))]
    lines += [f"{k}={v}" for k, v in env.items() if v]
    _atomic_write(env_path(state_dir), "\n".join(lines) + "\n")


@contextlib.contextmanager
def _lock(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "stack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- processes

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _running(proc: psutil.Process) -> bool:
    """True while ``proc`` runs; zombies count as gone, and a PID reused by another program is
    not ``proc`` (psutil compares the create time)."""
    try:
        return proc.is_running() and proc.status() not in _GONE
    except psutil.Error:
        return False


def _process(pid: int | None, needle: str | None = None) -> psutil.Process | None:
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
    return _process(pid, needle) is not None


def _session_procs(sid: int | None) -> list[psutil.Process]:
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
    return [p.pid for p in _session_procs(sid)]


def _terminate(procs: list[psutil.Process], grace: float) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, SIGKILL what is left; returns the PIDs signalled. psutil
    refuses to signal a PID that now belongs to another process, so a late reuse is never hit."""
    targets = [p for p in procs if _running(p)]
    for proc in targets:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in targets):
        time.sleep(0.1)
    for proc in targets:
        if _running(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in targets):
        time.sleep(0.05)
    return [p.pid for p in targets]


def _tail(path: Path | str | None, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_fh:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)


# ----------------------------------------------------------------------------- ports and URLs


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


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def redis_answers(url: str, timeout: float = 1.5) -> bool:
    """True when a Redis at ``url`` answers PING (raises StackError when it refuses us)."""
    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                          health_check_interval=0)
    try:
        return bool(client.ping())
    except redis.AuthenticationError as err:
        raise StackError(f"Redis at {redact_url(url)} refused the credentials: {err}") from None
    except redis.ResponseError as err:  # e.g. NOAUTH: it is a Redis, but not usable like this
        raise StackError(f"Redis at {redact_url(url)} answered with an error: {err}") from None
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _wait_redis(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"redis-server exited with code {proc.returncode}; its log "
                             f"{log_path}:\n{_tail(log_path)}")
        if redis_answers(url, timeout=0.5):
            return
        time.sleep(0.1)
    raise StackError(f"redis-server did not answer at {redact_url(url)} within {timeout:.0f} s; "
                     f"see {log_path}")


def _ray_temp_dir(state_dir: Path) -> Path:
    """Ray puts Unix sockets under its temp dir; their paths must stay under ~107 bytes."""
    candidate = Path(state_dir).resolve() / "ray"
    if len(str(candidate)) <= 32:
        return candidate
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"capsctl-ray-{digest}"


def _executable(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def _worker_command() -> list[str]:
    capsctl = _executable("capsctl")
    return [capsctl] if capsctl else [sys.executable, "-m", "services.cli"]


# ----------------------------------------------------------------------------- status


def status(settings: Settings) -> dict[str, Any] | None:
    """The recorded stack with liveness: ``record["redis"]["alive"]``, ``record["ray"]["alive"]``,
    ``record["workers"][i]["alive"]`` and ``record["healthy"]`` (everything recorded runs)."""
    record = read_stack(settings.state_dir)
    if record is None:
        return None
    healthy = True
    r = record.get("redis") or {}
    if r.get("started"):
        r["alive"] = pid_alive(r.get("pid"), str(r.get("port", "")) or None)
        healthy &= r["alive"]
    ray = record.get("ray") or {}
    if ray.get("started"):
        ray["alive"] = bool(session_pids(ray.get("session")))
        healthy &= ray["alive"]
    for w in record.get("workers") or []:
        w["alive"] = pid_alive(w.get("pid"), w.get("id"))
        healthy &= w["alive"]
    record["healthy"] = bool(healthy and record.get("complete"))
    return record


# ----------------------------------------------------------------------------- up


def up(settings: Settings, *, num_cpus: int | None = None, metrics_port: int | None = None,
       workers: int = 1, timeout: float = 180.0, log: Log | None = None) -> dict[str, Any]:
    """Start what is missing (see docs/architecture.md); returns the stack record with
    ``already_up`` True when a healthy stack was already running (then nothing is started)."""
    say: Log = log or (lambda _msg: None)
    if workers < 1:
        raise StackError("workers: must be at least 1")
    state_dir = Path(settings.state_dir).expanduser()
    with _lock(state_dir):
        current = status(settings)
        if current is not None:
            if current.get("healthy"):
                current["already_up"] = True
                return current
            say("found a stack record with stopped parts: taking it down and starting afresh")
            _down_locked(state_dir, grace=10.0, say=say)
        if metrics_port:
            taken = [metrics_port + i for i in range(workers) if not port_free(metrics_port + i, "0.0.0.0")]
            if taken:
                raise StackError(f"metrics port(s) {', '.join(map(str, taken))} already in use: pick another "
                                 f"--metrics-port or leave it out (a free port is then chosen)")
        record: dict[str, Any] = {"version": 1, "started_at": time.time(), "state_dir": str(state_dir),
                                  "complete": False, "redis": {}, "ray": {}, "workers": []}
        try:
            _up_locked(settings, state_dir, record, num_cpus=num_cpus, metrics_port=metrics_port,
                       workers=workers, timeout=timeout, say=say)
        except BaseException:
            say("start-up failed: stopping what was started")
            _down_locked(state_dir, grace=5.0, say=say)
            raise
        record["already_up"] = False
        return record


def _up_locked(settings: Settings, state_dir: Path, record: dict[str, Any], *, num_cpus: int | None,
               metrics_port: int | None, workers: int, timeout: float, say: Log) -> None:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _save(state_dir, record)

    # --- Redis
    url = settings.redis_url
    if redis_answers(url):
        record["redis"] = {"url": url, "started": False}
        say(f"Redis answers at {redact_url(url)}: using it")
    else:
        record["redis"] = _start_redis(url, state_dir, logs, say)
        url = record["redis"]["url"]
    _save(state_dir, record)

    # --- Ray
    auth_mode = os.environ.get("RAY_AUTH_MODE") or "token"
    if settings.ray_address:
        record["ray"] = {"address": settings.ray_address, "started": False}
        say(f"using the Ray cluster at {settings.ray_address} (RAY_ADDRESS)")
    else:
        cpus = int(num_cpus or os.cpu_count() or 1)
        record["ray"] = {"started": False, "num_cpus": cpus}
        _save(state_dir, record)
        record["ray"] = _start_ray(cpus, state_dir, logs, auth_mode, record, say)
    record["ray"]["auth_mode"] = auth_mode
    _save(state_dir, record)

    # --- workers
    env_values = {"CAPSNET_REDIS_URL": url, "CAPSNET_REDIS_PREFIX": settings.redis_prefix,
                  "RAY_ADDRESS": record["ray"]["address"], "RAY_AUTH_MODE": auth_mode}
    host = socket.gethostname().split(".")[0] or "host"
    tag = secrets.token_hex(2)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for i in range(workers):
        worker_id = f"{host}-stack{i}-{tag}"
        if metrics_port:
            port = metrics_port + i
        elif port_free(settings.metrics_port + i, "0.0.0.0"):
            port = settings.metrics_port + i
        else:
            port = free_port()
        env = {**os.environ, **env_values, "CAPSNET_METRICS_PORT": str(port),
               "CAPSNET_STATE_DIR": str(state_dir), "CAPSNET_ARTIFACTS": str(settings.artifacts),
               "PYTHONUNBUFFERED": "1"}
        if settings.data_dir is not None:
            env["CAPSNET_DATA_DIR"] = str(settings.data_dir)
        log_path = logs / f"worker-{i}.log"
        proc = _spawn([*_worker_command(), "worker", "--worker-id", worker_id, "--metrics-port", str(port)],
                      log_path, env)
        procs[worker_id] = proc
        record["workers"].append({"id": worker_id, "pid": proc.pid, "log": str(log_path),
                                  "metrics_port": port})
        _save(state_dir, record)
        say(f"started worker {worker_id} (pid {proc.pid})")

    # --- wait for the workers to register
    queue = JobQueue.from_settings(Settings(redis_url=url, redis_prefix=settings.redis_prefix,
                                            lease_seconds=settings.lease_seconds,
                                            heartbeat_seconds=settings.heartbeat_seconds))
    deadline = time.monotonic() + timeout
    pending = set(procs)
    while pending:
        registered = {str(w.get("id")): w for w in queue.workers()}
        for w in record["workers"]:
            info = registered.get(w["id"])
            if info is not None:
                w["metrics_url"] = info.get("metrics_url") or f"http://127.0.0.1:{w['metrics_port']}/metrics"
                w["hostname"] = info.get("hostname")
                w["resources"] = info.get("resources")
                pending.discard(w["id"])
        if not pending:
            break
        for worker_id in sorted(pending):
            proc = procs[worker_id]
            if proc.poll() is not None:
                entry = next(w for w in record["workers"] if w["id"] == worker_id)
                raise StackError(f"worker {worker_id} exited with code {proc.returncode} before registering; "
                                 f"its log {entry['log']}:\n{_tail(entry['log'])}")
        if time.monotonic() > deadline:
            raise StackError(f"worker(s) {', '.join(sorted(pending))} did not register in Redis within "
                             f"{timeout:.0f} s; see the logs in {logs}")
        time.sleep(0.25)
    queue.client.close()

    record["complete"] = True
    record["env_file"] = str(env_path(state_dir))
    _save(state_dir, record)
    _write_env(state_dir, env_values)


def _start_redis(url: str, state_dir: Path, logs: Path, say: Log) -> dict[str, Any]:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or (parsed.hostname or "") not in LOCAL_HOSTS:
        raise StackError(f"cannot reach Redis at {redact_url(url)}, and it is not on this machine, so "
                         f"`capsctl up` cannot start it; fix CAPSNET_REDIS_URL or unset it")
    if parsed.scheme == "rediss":
        raise StackError(f"cannot reach Redis at {redact_url(url)}; `capsctl up` starts only a plain "
                         f"(non-TLS) local Redis: unset CAPSNET_REDIS_URL or use redis://")
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not installed: install it (apt-get install redis-server) or set "
                         "CAPSNET_REDIS_URL to a running Redis")
    wanted = parsed.port or 6379
    port = wanted if port_free(wanted) else free_port()
    if port != wanted:
        say(f"port {wanted} is taken by something that is not an answering Redis: using port {port}")
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--daemonize", "no",
           "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", "", "--protected-mode", "yes"]
    password = unquote(parsed.password) if parsed.password else None
    if password:
        cmd += ["--requirepass", password]
    log_path = logs / "redis.log"
    proc = _spawn(cmd, log_path)
    auth = ""
    if parsed.password is not None:
        auth = f"{quote(unquote(parsed.username or ''), safe='')}:{quote(password or '', safe='')}@"
    db = (parsed.path or "/0").lstrip("/") or "0"
    new_url = f"redis://{auth}127.0.0.1:{port}/{db}"
    _wait_redis(new_url, proc, log_path)
    say(f"started redis-server on port {port} (pid {proc.pid})")
    return {"url": new_url, "started": True, "pid": proc.pid, "port": port, "dir": str(data_dir),
            "log": str(log_path)}


def _start_ray(cpus: int, state_dir: Path, logs: Path, auth_mode: str, record: dict[str, Any],
               say: Log) -> dict[str, Any]:
    ray_bin = _executable("ray")
    if ray_bin is None:
        raise StackError("the `ray` executable is not installed next to this Python; install ray[tune] "
                         "or set RAY_ADDRESS to a running cluster")
    port = free_port()
    temp_dir = _ray_temp_dir(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", f"--dashboard-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--log-style=record", "--log-color=false"]
    env = {**os.environ, **ray_node_env(), "RAY_AUTH_MODE": auth_mode}
    env.pop("RAY_ADDRESS", None)
    log_path = logs / "ray-start.log"
    proc = _spawn(cmd, log_path, env)
    address = f"127.0.0.1:{port}"
    info = {"address": address, "started": True, "session": proc.pid, "num_cpus": cpus, "port": port,
            "temp_dir": str(temp_dir), "log": str(log_path)}
    record["ray"] = info  # recorded before waiting, so a failed start can be taken down
    _save(state_dir, record)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise StackError(f"`ray start --head` did not finish within 120 s; see {log_path}") from None
    if code != 0:
        raise StackError(f"`ray start --head` failed with code {code}; its log {log_path}:\n{_tail(log_path)}")
    info["pids"] = session_pids(proc.pid)
    if not info["pids"]:
        raise StackError(f"`ray start --head` exited but left no Ray processes running; see {log_path}")
    say(f"started a Ray head at {address} ({cpus} CPUs)")
    return info


# ----------------------------------------------------------------------------- down


def _stop_ray_session(sid: int, grace: float) -> list[int]:
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
        procs = [p for p in _session_procs(sid) if pick(name(p))]
        if procs:
            stopped += _terminate(procs, grace / len(buckets))
    late = _session_procs(sid)  # anything spawned while the others were stopping
    if late:
        stopped += _terminate(late, 1.0)
    return stopped


def down(settings: Settings, *, grace: float = 20.0, log: Log | None = None) -> dict[str, Any] | None:
    """Stop what ``up`` recorded and remove the record; returns the record (None: nothing was up)."""
    say: Log = log or (lambda _msg: None)
    state_dir = Path(settings.state_dir).expanduser()
    with _lock(state_dir):
        return _down_locked(state_dir, grace=grace, say=say)


def _down_locked(state_dir: Path, *, grace: float, say: Log) -> dict[str, Any] | None:
    record = read_stack(state_dir)
    if record is None:
        with contextlib.suppress(FileNotFoundError):
            env_path(state_dir).unlink()
        return None
    stopped: dict[str, Any] = {"workers": [], "ray": [], "redis": []}

    workers = [w for w in record.get("workers") or [] if isinstance(w, dict)]
    procs = [p for p in (_process(w.get("pid"), w.get("id")) for w in workers) if p is not None]
    if procs:
        say(f"stopping {len(procs)} worker(s) (SIGTERM; their jobs go back to the queue)")
        stopped["workers"] = _terminate(procs, grace)
    for proc in procs:  # anything our (verified) workers left behind in their sessions
        leftovers = _session_procs(proc.pid)
        if leftovers:
            _terminate(leftovers, 5.0)

    ray = record.get("ray") or {}
    if ray.get("started") and ray.get("session"):
        sid = int(ray["session"])
        pids = session_pids(sid)
        if pids:
            say(f"stopping the Ray head at {ray.get('address')} ({len(pids)} processes)")
            stopped["ray"] = _stop_ray_session(sid, min(grace, 15.0))

    r = record.get("redis") or {}
    if r.get("started") and r.get("pid"):
        proc = _process(int(r["pid"]), str(r.get("port", "")) or None)
        if proc is not None:
            say(f"stopping redis-server on port {r.get('port')} (its data stays in {r.get('dir')})")
            stopped["redis"] = _terminate([proc], grace)

    for path in (stack_path(state_dir), env_path(state_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    record["stopped"] = stopped
    return record


__all__ = ["ENV_FILE", "STACK_FILE", "StackError", "down", "env_path", "free_port", "load_env", "pid_alive",
           "port_free", "read_stack", "redact_url", "redis_answers", "session_pids", "stack_path", "status", "up"]
