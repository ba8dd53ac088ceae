"""``capsctl up`` / ``capsctl down``: the embedded single-machine stack (a local redis-server, a
Ray head and N workers, recorded in ``<state_dir>/stack.json``; see docs/architecture.md). This
module orchestrates; process supervision is in ``services.stack.processes`` and the record files in
``services.stack.record`` (their public names are re-exported here).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import redis

from services.config import Settings, ray_node_env
from services.queue.connection import redis_client
from services.queue.jobqueue import JobQueue
from services.queue.redis_health import read_health
from services.stack.processes import (
    find_process,
    free_port,
    log_tail,
    pid_alive,
    port_free,
    session_pids,
    session_procs,
    spawn,
    stop_ray_session,
    terminate,
)
from services.stack.prometheus_config import write_prometheus_config
from services.stack.record import (
    env_path,
    read_stack,
    save_record,
    stack_path,
    state_lock,
    write_env,
)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")

Log = Callable[[str], None]


class StackError(RuntimeError):
    """``up``/``down`` could not do its job; the message is one line (plus a log tail at most)."""


# ----------------------------------------------------------------------------- URLs


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
                             f"{log_path}:\n{log_tail(log_path)}")
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
       workers: int = 1, timeout: float = 180.0, log: Log | None = None,
       node_ip_address: str = "127.0.0.1") -> dict[str, Any]:
    """Start what is missing (see docs/architecture.md); returns the stack record with
    ``already_up`` True when a healthy stack was already running (then nothing is started).

    ``node_ip_address``: the address the Ray head listens on; loopback by default (Ray then binds
    its GCS and raylet to 127.0.0.1 only), this machine's cluster address to let other nodes join."""
    say: Log = log or (lambda _msg: None)
    if workers < 1:
        raise StackError("workers: must be at least 1")
    try:
        ipaddress.ip_address(node_ip_address)
    except ValueError:
        raise StackError(f"--node-ip-address: must be an IP address of this machine (got {node_ip_address!r})") from None
    state_dir = Path(settings.state_dir).expanduser()
    with state_lock(state_dir):
        current = status(settings)
        if current is not None:
            if current.get("healthy"):
                current["already_up"] = True
                return current
            say("found a stack record with stopped parts: taking it down and starting afresh")
            _down_locked(state_dir, grace=10.0, say=say)
        if metrics_port:
            taken = [metrics_port + i for i in range(workers) if not port_free(metrics_port + i, settings.metrics_addr)]
            if taken:
                raise StackError(f"metrics port(s) {', '.join(map(str, taken))} already in use: pick another "
                                 f"--metrics-port or leave it out (a free port is then chosen)")
        record: dict[str, Any] = {"version": 1, "started_at": time.time(), "state_dir": str(state_dir),
                                  "complete": False, "redis": {}, "ray": {}, "workers": []}
        try:
            _up_locked(settings, state_dir, record, num_cpus=num_cpus, metrics_port=metrics_port,
                       node_ip_address=node_ip_address,
                       workers=workers, timeout=timeout, say=say)
        except BaseException:
            say("start-up failed: stopping what was started")
            _down_locked(state_dir, grace=5.0, say=say)
            raise
        record["already_up"] = False
        return record


def _up_locked(settings: Settings, state_dir: Path, record: dict[str, Any], *, num_cpus: int | None,
               metrics_port: int | None, workers: int, timeout: float, say: Log,
               node_ip_address: str = "127.0.0.1") -> None:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    save_record(state_dir, record)
    url = _up_redis(settings, state_dir, logs, record, say)
    auth_mode = _up_ray(settings, state_dir, logs, record, say, num_cpus, node_ip_address)
    env_values = {"CAPSNET_REDIS_URL": url, "CAPSNET_REDIS_PREFIX": settings.redis_prefix,
                  "RAY_ADDRESS": record["ray"]["address"], "RAY_AUTH_MODE": auth_mode,
                  "CAPSNET_METRICS_ADDR": settings.metrics_addr}
    procs = _spawn_workers(settings, state_dir, logs, record, say, env_values, workers, metrics_port)
    _wait_for_registration(settings, url, record, procs, logs, timeout)
    record["prometheus_config"] = str(write_prometheus_config(state_dir, record))
    record["complete"] = True
    record["env_file"] = str(env_path(state_dir))
    save_record(state_dir, record)
    write_env(state_dir, env_values)


def _up_redis(settings: Settings, state_dir: Path, logs: Path, record: dict[str, Any], say: Log) -> str:
    """Use the Redis that answers at the settings' URL, else start one; returns the URL in use."""
    url = settings.redis_url
    if redis_answers(url):
        record["redis"] = {"url": url, "started": False}
        say(f"Redis answers at {redact_url(url)}: using it")
    else:
        record["redis"] = _start_redis(url, state_dir, logs, say)
        url = record["redis"]["url"]
    record["redis"].update(_redis_policy(url, say))
    save_record(state_dir, record)
    return url


def _up_ray(settings: Settings, state_dir: Path, logs: Path, record: dict[str, Any], say: Log,
            num_cpus: int | None, node_ip_address: str) -> str:
    """Use RAY_ADDRESS's cluster, else start a head; returns the Ray auth mode the workers use."""
    auth_mode = os.environ.get("RAY_AUTH_MODE") or "token"
    if settings.ray_address:
        record["ray"] = {"address": settings.ray_address, "started": False}
        say(f"using the Ray cluster at {settings.ray_address} (RAY_ADDRESS)")
    else:
        cpus = int(num_cpus or os.cpu_count() or 1)
        record["ray"] = {"started": False, "num_cpus": cpus}
        save_record(state_dir, record)
        record["ray"] = _start_ray(cpus, state_dir, logs, auth_mode, record, say, node_ip_address)
    record["ray"]["auth_mode"] = auth_mode
    save_record(state_dir, record)
    return auth_mode


def _spawn_workers(settings: Settings, state_dir: Path, logs: Path, record: dict[str, Any], say: Log,
                   env_values: dict[str, str], workers: int,
                   metrics_port: int | None) -> dict[str, subprocess.Popen[bytes]]:
    host = socket.gethostname().split(".")[0] or "host"
    tag = secrets.token_hex(2)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for i in range(workers):
        worker_id = f"{host}-stack{i}-{tag}"
        if metrics_port:
            port = metrics_port + i
        elif port_free(settings.metrics_port + i, settings.metrics_addr):
            port = settings.metrics_port + i
        else:
            port = free_port()
        env = {**os.environ, **env_values, "CAPSNET_METRICS_PORT": str(port),
               "CAPSNET_STATE_DIR": str(state_dir), "CAPSNET_ARTIFACTS": str(settings.artifacts),
               "PYTHONUNBUFFERED": "1"}
        if settings.data_dir is not None:
            env["CAPSNET_DATA_DIR"] = str(settings.data_dir)
        log_path = logs / f"worker-{i}.log"
        proc = spawn([*_worker_command(), "worker", "--worker-id", worker_id, "--metrics-port", str(port)],
                      log_path, env)
        procs[worker_id] = proc
        record["workers"].append({"id": worker_id, "pid": proc.pid, "log": str(log_path),
                                  "metrics_port": port})
        save_record(state_dir, record)
        say(f"started worker {worker_id} (pid {proc.pid})")
    return procs


def _wait_for_registration(settings: Settings, url: str, record: dict[str, Any],
                           procs: dict[str, subprocess.Popen[bytes]], logs: Path, timeout: float) -> None:
    """Until every spawned worker shows in Redis' registry (recording its metrics URL and resources);
    a worker that exits first, or the timeout, is a StackError naming its log."""
    queue = JobQueue.from_settings(Settings(redis_url=url, redis_prefix=settings.redis_prefix,
                                            lease_seconds=settings.lease_seconds,
                                            heartbeat_seconds=settings.heartbeat_seconds))
    deadline = time.monotonic() + timeout
    pending = set(procs)
    try:
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
                return
            for worker_id in sorted(pending):
                proc = procs[worker_id]
                if proc.poll() is not None:
                    entry = next(w for w in record["workers"] if w["id"] == worker_id)
                    raise StackError(f"worker {worker_id} exited with code {proc.returncode} before registering; "
                                     f"its log {entry['log']}:\n{log_tail(entry['log'])}")
            if time.monotonic() > deadline:
                raise StackError(f"worker(s) {', '.join(sorted(pending))} did not register in Redis within "
                                 f"{timeout:.0f} s; see the logs in {logs}")
            time.sleep(0.25)
    finally:
        queue.client.close()


def _redis_policy(url: str, say: Log) -> dict[str, Any]:
    """The Redis' eviction policy and warnings (an evicting Redis loses jobs: say so loudly)."""
    client = redis_client(url, socket_connect_timeout=5)
    try:
        health = read_health(client)
    except redis.RedisError as exc:
        return {"maxmemory_policy": "unknown", "warnings": [f"could not read the Redis health: {exc}"]}
    finally:
        client.close()
    for warning in health.warnings():
        say(f"WARNING: {warning}")
    return {"maxmemory_policy": health.policy or "unknown", "warnings": health.warnings()}


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
           "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", "", "--protected-mode", "yes",
           # the queue needs every key it wrote: a full Redis must refuse writes, never evict
           "--maxmemory-policy", "noeviction"]
    password = unquote(parsed.password) if parsed.password else None
    if password:
        cmd += ["--requirepass", password]
    log_path = logs / "redis.log"
    proc = spawn(cmd, log_path)
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
               say: Log, node_ip_address: str = "127.0.0.1") -> dict[str, Any]:
    ray_bin = _executable("ray")
    if ray_bin is None:
        raise StackError("the `ray` executable is not installed next to this Python; install ray[tune] "
                         "or set RAY_ADDRESS to a running cluster")
    port, dashboard_port = free_port(), free_port()
    temp_dir = _ray_temp_dir(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ray_bin, "start", "--head", f"--port={port}", f"--node-ip-address={node_ip_address}",
           f"--num-cpus={cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--log-style=record", "--log-color=false"]
    env = {**os.environ, **ray_node_env(), "RAY_AUTH_MODE": auth_mode}
    env.pop("RAY_ADDRESS", None)
    log_path = logs / "ray-start.log"
    proc = spawn(cmd, log_path, env)
    address = f"{node_ip_address}:{port}"
    info = {"address": address, "started": True, "session": proc.pid, "num_cpus": cpus, "port": port,
            "dashboard_url": f"http://{node_ip_address}:{dashboard_port}", "temp_dir": str(temp_dir),
            "log": str(log_path)}
    record["ray"] = info  # recorded before waiting, so a failed start can be taken down
    save_record(state_dir, record)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise StackError(f"`ray start --head` did not finish within 120 s; see {log_path}") from None
    if code != 0:
        raise StackError(f"`ray start --head` failed with code {code}; its log {log_path}:\n{log_tail(log_path)}")
    info["pids"] = session_pids(proc.pid)
    if not info["pids"]:
        raise StackError(f"`ray start --head` exited but left no Ray processes running; see {log_path}")
    say(f"started a Ray head at {address} ({cpus} CPUs); Ray dashboard at {info['dashboard_url']}; "
        f"Prometheus discovers Ray's metrics from {temp_dir / 'prom_metrics_service_discovery.json'}")
    return info


# ----------------------------------------------------------------------------- down


def down(settings: Settings, *, grace: float = 20.0, log: Log | None = None) -> dict[str, Any] | None:
    """Stop what ``up`` recorded and remove the record; returns the record (None: nothing was up)."""
    say: Log = log or (lambda _msg: None)
    state_dir = Path(settings.state_dir).expanduser()
    with state_lock(state_dir):
        return _down_locked(state_dir, grace=grace, say=say)


def _down_locked(state_dir: Path, *, grace: float, say: Log) -> dict[str, Any] | None:
    record = read_stack(state_dir)
    if record is None:
        with contextlib.suppress(FileNotFoundError):
            env_path(state_dir).unlink()
        return None
    stopped: dict[str, Any] = {"workers": [], "ray": [], "redis": []}

    workers = [w for w in record.get("workers") or [] if isinstance(w, dict)]
    procs = [p for p in (find_process(w.get("pid"), w.get("id")) for w in workers) if p is not None]
    if procs:
        say(f"stopping {len(procs)} worker(s) (SIGTERM; their jobs go back to the queue)")
        stopped["workers"] = terminate(procs, grace)
    for proc in procs:  # anything our (verified) workers left behind in their sessions
        leftovers = session_procs(proc.pid)
        if leftovers:
            terminate(leftovers, 5.0)

    ray = record.get("ray") or {}
    if ray.get("started") and ray.get("session"):
        sid = int(ray["session"])
        pids = session_pids(sid)
        if pids:
            say(f"stopping the Ray head at {ray.get('address')} ({len(pids)} processes)")
            stopped["ray"] = stop_ray_session(sid, min(grace, 15.0))

    r = record.get("redis") or {}
    if r.get("started") and r.get("pid"):
        proc = find_process(int(r["pid"]), str(r.get("port", "")) or None)
        if proc is not None:
            say(f"stopping redis-server on port {r.get('port')} (its data stays in {r.get('dir')})")
            stopped["redis"] = terminate([proc], grace)

    for path in (stack_path(state_dir), env_path(state_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    record["stopped"] = stopped
    return record
