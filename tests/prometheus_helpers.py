"""Test helpers: a real Prometheus server, and the PromQL of every Grafana panel.

Start a private Prometheus that scrapes given targets::

    with running_prometheus(tmp_path, scrape_configs=[scrape_job("capsctl", [f"127.0.0.1:{port}"])]) as prom:
        prom.wait_for_targets(1)
        prom.wait_for("capsnet_workers_alive")
        prom.query("max(capsnet_workers_alive)")            # -> list of {"metric":..., "value": [t, "1"]}

Check the dashboards::

    for panel in load_panel_queries(variables={"job_id": job_id}):
        if panel.cuda_only and not on_cuda:
            continue
        assert prom.query_range(panel.expr, minutes=10), panel

Training series carry ``job_id`` only while the job runs and are marked stale the moment they
leave ``/metrics``, so after a job ends an instant query finds nothing: check panels with
``query_range`` (what Grafana does for time series panels) over the period the job ran.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT, free_port

DASHBOARDS_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES_DIR = REPO_ROOT / "deploy" / "prometheus" / "rules"
# Metrics that only exist when training on CUDA; panels over them are empty on CPU.
# Series only a GPU node has: per-job CUDA memory, and NVML's per-device gauges.
CUDA_ONLY_METRICS = frozenset({"capsnet_gpu_memory_used_bytes", "capsnet_gpu_utilization_ratio",
                               "capsnet_gpu_device_memory_used_bytes", "capsnet_gpu_device_memory_total_bytes"})
TUNE_ONLY_METRICS = frozenset({"capsnet_tune_trial_epoch", "capsnet_tune_trial_val_accuracy_ratio"})
INSTALL_HINT = "run `apt-get install -y prometheus` (Debian's package ships prometheus and promtool)"


def require_binary(name: str) -> str:
    """Path of ``prometheus``/``promtool``; raises (a test failure, not a skip) when missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: {INSTALL_HINT}")
    return path


def scrape_job(job_name: str, targets: Sequence[str], interval: str = "1s",
               labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One ``scrape_configs`` entry with static targets (``host:port``)."""
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    return {"job_name": job_name, "scrape_interval": interval, "scrape_timeout": interval,
            "static_configs": [static]}


class PrometheusServer:
    """A ``prometheus`` child process with its own config and TSDB under ``workdir``."""

    def __init__(self, workdir: Path, config: Mapping[str, Any] | str, port: int | None = None,
                 rule_files: Sequence[Path] = ()) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, str):
            text = config
        else:
            cfg = dict(config)
            if rule_files:
                cfg["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
            text = yaml.safe_dump(cfg, sort_keys=False)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(text)
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        binary = require_binary("prometheus")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1d", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready on {self.url} after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ---- HTTP API

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises with Prometheus' error message."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from exc
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the ``result`` list (vector/matrix), or ``[scalar]`` for a scalar."""
        data = self.api("query", query=expr, time=at)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def query_range(self, expr: str, start: float | None = None, end: float | None = None,
                    step: float = 1.0, minutes: float = 10.0) -> list[dict[str, Any]]:
        """Range query (as a Grafana time series panel runs it); default: the last ``minutes``."""
        end = time.time() if end is None else end
        start = end - minutes * 60 if start is None else start
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None if empty; first if several)."""
        result = self.query(expr)
        if not result:
            return None
        sample = result[0]["value"] if isinstance(result[0], dict) else result[0]
        return float(sample[1])

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for_targets(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until ``count`` targets report health ``up``."""
        deadline = time.monotonic() + timeout
        while True:
            up = [t for t in self.targets() if t.get("health") == "up"]
            if len(up) >= count:
                return up
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(up)}/{count} targets up after {timeout}s: {self.targets()}")
            time.sleep(0.2)

    def wait_for(self, expr: str, timeout: float = 20.0, predicate=bool) -> list[dict[str, Any]]:
        """Poll an instant query until ``predicate(result)`` holds; returns the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} gave {result} after {timeout}s")
            time.sleep(0.2)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PromQLError(RuntimeError):
    pass


@contextmanager
def running_prometheus(workdir: Path, scrape_configs: Sequence[Mapping[str, Any]] = (),
                       config: Mapping[str, Any] | str | None = None, rule_files: Sequence[Path] = (),
                       evaluation_interval: str = "1s") -> Iterator[PrometheusServer]:
    """Start Prometheus (``config`` as given, or built from ``scrape_configs``), yield it, stop it."""
    if config is None:
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": evaluation_interval},
                  "scrape_configs": [dict(c) for c in scrape_configs]}
    server = PrometheusServer(workdir, config, rule_files=rule_files)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- Grafana dashboards

@dataclass(frozen=True)
class PanelQuery:
    dashboard: str       # file name, e.g. "capsnet-training.json"
    panel: str           # panel title
    ref_id: str          # target refId
    raw_expr: str        # as written in the dashboard
    expr: str            # with template variables substituted
    cuda_only: bool      # only has data when training on CUDA
    tune_only: bool = False  # only has data while a sweep runs

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} [{self.ref_id}]: {self.expr}"


# Grafana's built-in interval variables and what the tests use for them.
DEFAULT_BUILTINS = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "10m",
    "__range_s": "600",
    "__range_ms": "600000",
    "__interval_ms": "5000",
}

_VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)(?::[\w]+)?\]\]|\$(\w+)")


def substitute_variables(expr: str, variables: Mapping[str, str] | None = None,
                         builtins: Mapping[str, str] | None = None) -> str:
    """Replace Grafana template variables in a PromQL expression.

    ``variables`` gives dashboard variables (e.g. ``{"job_id": "abc123"}``); a variable not given
    becomes ``.*`` (Grafana's "All" for a regex matcher, which is how the dashboards use them).
    ``builtins`` overrides ``DEFAULT_BUILTINS`` (``$__rate_interval`` -> ``30s`` etc.).
    ``$datasource`` is replaced by ``prometheus`` (it only ever appears outside ``expr``).
    """
    values = {**DEFAULT_BUILTINS, **(builtins or {}), "datasource": "prometheus", **(variables or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return str(values.get(name, ".*"))

    return _VAR_RE.sub(repl, expr)


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows; rows themselves are skipped."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def load_panel_queries(directory: Path = DASHBOARDS_DIR, variables: Mapping[str, str] | None = None,
                       builtins: Mapping[str, str] | None = None) -> list[PanelQuery]:
    """Every panel target's PromQL from every dashboard in ``directory``, variables substituted."""
    queries: list[PanelQuery] = []
    for name, dashboard in load_dashboards(directory).items():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                raw = target.get("expr", "")
                queries.append(PanelQuery(
                    dashboard=name, panel=panel.get("title", f"panel {panel.get('id')}"),
                    ref_id=target.get("refId", "A"), raw_expr=raw,
                    expr=substitute_variables(raw, variables, builtins),
                    cuda_only=any(m in raw for m in CUDA_ONLY_METRICS),
                    tune_only=any(m in raw for m in TUNE_ONLY_METRICS)))
    return queries


METRIC_NAME_RE = re.compile(r"\b(capsnet_[a-zA-Z0-9_]+)\b")


def metric_names_in(expr: str) -> set[str]:
    """``capsnet_*`` metric names an expression reads."""
    return set(METRIC_NAME_RE.findall(expr))
