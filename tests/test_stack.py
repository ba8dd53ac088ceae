"""``capsctl up`` / ``capsctl down`` for real: a redis-server on a free port, a Ray head and a
worker, as the user would run them (subprocesses), then everything gone after ``down``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.config import Settings
from services.stack import processes, stack
from services.stack import record as stack_record

from .conftest import REPO_ROOT, free_port
from .prometheus_helpers import require_binary
from .service_helpers import wait_until

pytestmark = pytest.mark.slow


def test_up_status_down(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "capsctl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "services.cli"]
    state = tmp_path / "state"
    redis_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAPSCTL_", "CAPSNET_REDIS", "RAY_"))}
    env.update({"CAPSNET_STATE_DIR": str(state), "CAPSNET_ARTIFACTS": str(tmp_path / "artifacts"),
                "CAPSNET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})  # nothing answers there yet

    def capsctl(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*cmd, *args], env=environ or env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=150)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    settings = Settings.from_env(env)
    try:
        out = capsctl("up", "--num-cpus", "2", "--metrics-port", str(metrics_port)).stdout
        record = json.loads((state / "stack.json").read_text())
        assert record["complete"] and record["redis"]["started"] and record["ray"]["started"]
        assert record["redis"]["port"] == redis_port and f"redis://127.0.0.1:{redis_port}/0" in out
        # Its own redis-server never evicts (job records, idempotency keys) and keeps an AOF.
        import redis as redis_py

        own = redis_py.Redis(port=redis_port)
        assert own.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert own.config_get("appendonly") == {"appendonly": "yes"}
        [worker] = record["workers"]
        assert worker["metrics_port"] == metrics_port
        assert f":{metrics_port}/metrics" in worker["metrics_url"] and worker["metrics_url"] in out
        assert record["ray"]["address"] in out and worker["id"] in out
        # The Ray dashboard `up` started is printed, and answers.
        dashboard = record["ray"]["dashboard_url"]
        assert dashboard in out
        import urllib.request

        def answers() -> bool:
            try:
                return urllib.request.urlopen(dashboard, timeout=5).status == 200
            except OSError:
                return False

        wait_until(answers, 60, interval=1, what="the Ray dashboard to answer")
        # A Prometheus config for this stack: its worker, and its own Ray's discovery file (not /tmp/ray).
        prom_config = Path(record["prometheus_config"])
        assert f"prometheus --config.file={prom_config}" in out
        prom = yaml.safe_load(prom_config.read_text())
        jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
        assert jobs["capsctl"]["static_configs"][0]["targets"] == [f"127.0.0.1:{metrics_port}"]
        assert jobs["ray"]["file_sd_configs"][0]["files"] == [
            str(Path(record["ray"]["temp_dir"]) / "prom_metrics_service_discovery.json")]
        checked = subprocess.run([require_binary("promtool"), "check", "config", str(prom_config)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        redis_pid, ray_sid = record["redis"]["pid"], record["ray"]["session"]
        ray_pids = processes.session_pids(ray_sid)
        assert processes.pid_alive(redis_pid, str(redis_port)) and processes.pid_alive(worker["pid"], worker["id"])
        assert len(ray_pids) >= 2  # gcs_server, raylet, ...
        # One machine: the metrics endpoint and Redis listen on loopback only.
        # Ray's GCS is started with --node-ip-address 127.0.0.1 and advertises it, but Ray 2.60's
        # gRPC server still binds the wildcard ("::"): no ray start flag narrows it (see README).
        listening = _listening({redis_port, metrics_port})
        assert listening == {redis_port: {"127.0.0.1"}, metrics_port: {"127.0.0.1"}}, listening
        assert record["ray"]["address"].startswith("127.0.0.1:")
        assert (state / "env").read_text().count(f"CAPSNET_REDIS_URL=redis://127.0.0.1:{redis_port}/0") == 1

        # Later invocations without CAPSNET_REDIS_URL find the stack's Redis through <state>/env.
        plain = {k: v for k, v in env.items() if k != "CAPSNET_REDIS_URL"}
        info = json.loads(capsctl("status", "--json", environ=plain).stdout)
        assert [w["id"] for w in info["workers"]] == [worker["id"]]
        assert info["cluster"]["cpus"] == 2 and info["redis_url"] == f"redis://127.0.0.1:{redis_port}/0"
        assert "already up" in capsctl("up", environ=plain).stdout

        down = capsctl("down", environ=plain)
        assert "stopped 1 worker process(es)" in down.stdout and "redis-server" in down.stdout
        assert not (state / "stack.json").exists() and not (state / "env").exists()
        assert not processes.pid_alive(redis_pid) and not processes.pid_alive(worker["pid"])
        assert not any(processes.pid_alive(p) for p in ray_pids) and processes.session_pids(ray_sid) == []
        assert (state / "redis").is_dir() and (state / "logs" / "worker-0.log").is_file()
        assert "nothing to stop" in capsctl("down", environ=plain).stdout
    finally:
        stack.down(settings, grace=5)
        temp = stack._ray_temp_dir(state)
        if temp != state / "ray":
            shutil.rmtree(temp, ignore_errors=True)


def _listening(ports: set[int]) -> dict[int, set[str]]:
    """The addresses listening on ``ports`` on this machine (TCP, IPv4 and IPv6)."""
    import psutil

    found: dict[int, set[str]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports:
            found.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
    return found


def test_metrics_server_binds_to_capsnet_metrics_addr() -> None:
    """The worker's exporter binds to ``CAPSNET_METRICS_ADDR`` (default loopback)."""
    from prometheus_client import CollectorRegistry

    from services.config import SettingsError
    from services.metrics.http import start_metrics_server, stop_metrics_server

    assert Settings.from_env({}).metrics_addr == "127.0.0.1"
    assert Settings.from_env({"CAPSNET_METRICS_ADDR": "0.0.0.0"}).metrics_addr == "0.0.0.0"
    with pytest.raises(SettingsError, match="CAPSNET_METRICS_ADDR: must be an IP address"):
        Settings.from_env({"CAPSNET_METRICS_ADDR": "everywhere"})
    for addr in ("127.0.0.1", "0.0.0.0"):
        port = start_metrics_server(0, registry=CollectorRegistry(), addr=addr)
        try:
            assert _listening({port}) == {port: {addr}}
        finally:
            stop_metrics_server(port)
    port = start_metrics_server(0, registry=CollectorRegistry())
    try:
        assert _listening({port}) == {port: {"127.0.0.1"}}
    finally:
        stop_metrics_server(port)


def test_down_skips_stale_and_reused_pids(tmp_path: Path) -> None:
    """A record whose PIDs died (or now belong to other programs) is cleared without killing anything."""
    state = tmp_path / "state"
    state.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a PID that is not ours to stop
    try:
        record = {"version": 1, "complete": True,
                  "redis": {"started": True, "pid": dead.pid, "port": 1, "url": "redis://127.0.0.1:1/0"},
                  "ray": {"started": True, "session": dead.pid, "address": "127.0.0.1:1"},
                  "workers": [{"id": "w-gone", "pid": other.pid, "log": "x"}]}
        (state / "stack.json").write_text(json.dumps(record))
        (state / "env").write_text("# c\nexport CAPSNET_REDIS_URL='redis://127.0.0.1:1/0'\nOTHER=1\n")
        assert stack_record.load_env(state) == {"CAPSNET_REDIS_URL": "redis://127.0.0.1:1/0"}
        settings = Settings.from_env({"CAPSNET_STATE_DIR": str(state)})
        assert stack.status(settings)["healthy"] is False
        result = stack.down(settings, grace=1)
        assert result is not None and result["stopped"] == {"workers": [], "ray": [], "redis": []}
        assert other.poll() is None  # still running: its command line is not a capsctl worker's
        assert not (state / "stack.json").exists() and stack_record.load_env(state) == {}
        assert stack.down(settings) is None
    finally:
        other.kill()
        other.wait()


def test_up_refuses_a_node_ip_address_that_is_not_an_ip(tmp_path: Path) -> None:
    settings = Settings.from_env({"CAPSNET_STATE_DIR": str(tmp_path / "state")})
    with pytest.raises(stack.StackError, match="--node-ip-address: must be an IP address"):
        stack.up(settings, node_ip_address="everywhere")
    assert not (tmp_path / "state" / "stack.json").exists()  # nothing was started
