"""deploy/: Prometheus config and rules (promtool), manifests, Grafana dashboards, and their
consistency with the code (env var names, ports, image names, metric names)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.metrics import gpu as mg
from services.metrics import http as mh
from services.metrics import queue as mq
from services.metrics import redis_state as mr
from services.metrics import worker as m
from tests.conftest import REPO_ROOT
from tests.prometheus_helpers import (
    INSTALL_HINT,
    PROMETHEUS_CONFIG,
    RULES_DIR,
    iter_panels,
    load_dashboards,
    load_panel_queries,
    metric_names_in,
    running_prometheus,
    scrape_job,
    substitute_variables,
)
from tests.test_metrics import RedisQueueReadDouble

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
CONFIG_PY = REPO_ROOT / "services" / "config.py"
RULES_TEST = DEPLOY / "prometheus" / "tests" / "capsnet_rules_test.yml"

ENV_VARS = ("CAPSNET_REDIS_URL", "CAPSNET_REDIS_PREFIX", "RAY_ADDRESS", "CAPSNET_ARTIFACTS",
            "CAPSNET_METRICS_PORT", "CAPSNET_STATE_DIR", "CAPSNET_DATA_DIR")
IMAGE_REPO = "ghcr.io/capsctl/capsctl"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool is not installed: {INSTALL_HINT}")
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_yaml_docs(p)]


def k8s_doc(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def pyproject_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)


def k8s_prometheus_config() -> str:
    return k8s_doc("ConfigMap", "prometheus-config")["data"]["prometheus.yml"]


# --------------------------------------------------------------------------- promtool

def test_promtool_check_config_and_rules() -> None:
    result = run_promtool("check", "config", PROMETHEUS_CONFIG)  # also loads rules/*.yml
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr
    rules = sorted(RULES_DIR.glob("*.yml"))
    assert rules
    result = run_promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    result = run_promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_k8s_prometheus_config(tmp_path: Path) -> None:
    cfg = yaml.safe_load(k8s_prometheus_config())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"capsctl", "ray"}
    for job in jobs.values():
        assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    path = tmp_path / "prometheus.yml"
    path.write_text(k8s_prometheus_config())
    result = run_promtool("check", "config", path)
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's prometheus is built without Kubernetes discovery: check everything else.
        for job in cfg["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["pod.example:9310"]}]
        path.write_text(yaml.safe_dump(cfg))
        result = run_promtool("check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_rules_are_a_copy_of_the_rules_file() -> None:
    data = k8s_doc("ConfigMap", "prometheus-rules")["data"]
    assert data == {p.name: p.read_text() for p in RULES_DIR.glob("*.yml")}


# --------------------------------------------------------------------------- manifests

def test_every_manifest_is_valid_yaml() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")]
    assert len(files) >= 10
    for path in files:
        docs = load_yaml_docs(path)
        assert docs, path
        assert all(isinstance(d, dict) for d in docs), path
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "capsctl", doc["metadata"]


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kust["images"] == [{"name": IMAGE_REPO, "newTag": pyproject_version()}]


def test_compose_services() -> None:
    c = compose()
    svc = c["services"]
    assert {"redis", "ray-head", "capsctl-worker", "prometheus", "grafana"} <= set(svc)
    redis_cmd = " ".join(svc["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and any(v.endswith(":/data") for v in svc["redis"]["volumes"])
    head = " ".join(svc["ray-head"]["command"])
    assert "ray start --head --block" in head and "--metrics-export-port=" in head and "--dashboard-port=" in head
    worker = svc["capsctl-worker"]
    assert worker["command"] == ["capsctl", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # Prometheus reads the head's service discovery file and our config; Grafana our provisioning.
    prom_vols = svc["prometheus"]["volumes"]
    assert "../prometheus:/etc/prometheus:ro" in prom_vols
    assert any(v.endswith(":/tmp/ray:ro") and v.split(":")[0] in [x.split(":")[0] for x in svc["ray-head"]["volumes"]]
               for v in prom_vols)
    graf_vols = svc["grafana"]["volumes"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in graf_vols
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in graf_vols
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/capsctl.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    # Relative host paths exist.
    for service in svc.values():
        for vol in service.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                assert (COMPOSE.parent / host).exists(), vol
    assert (COMPOSE.parent / svc["ray-head"]["build"]["context"] / svc["ray-head"]["build"]["dockerfile"]).is_file()


def test_k8s_raycluster_redis_and_worker() -> None:
    ray = k8s_doc("RayCluster", "capsnet")
    assert ray["apiVersion"] == "ray.io/v1"
    assert ray["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    gpu_groups = [g for g in ray["spec"]["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups
    redis_set = k8s_doc("StatefulSet", "redis")
    args = " ".join(redis_set["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and redis_set["spec"]["volumeClaimTemplates"]
    worker = k8s_doc("Deployment", "capsctl-worker")
    pod = worker["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["capsctl", "worker"]
    assert {"configMapRef": {"name": "capsctl-config"}} in container["envFrom"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert set(worker["spec"]["selector"]["matchLabels"].items()) <= set(pod["metadata"]["labels"].items())


# --------------------------------------------------------------------------- consistency with the code

def config_source() -> str:
    return CONFIG_PY.read_text()


def test_env_var_names_match_services_config() -> None:
    """Deploy files set every setting the service reads, under the names services/config.py uses."""
    worker_env = compose()["services"]["capsctl-worker"]["environment"]
    configmap = k8s_doc("ConfigMap", "capsctl-config")["data"]
    for name in ENV_VARS:
        assert name in worker_env, f"compose capsctl-worker lacks {name}"
        assert name in configmap, f"k8s capsctl-config lacks {name}"
    source = config_source()
    missing = [n for n in ENV_VARS if n not in source]
    assert not missing, f"services/config.py does not read {missing}"
    known = set(re.findall(r"\b(CAPSNET_[A-Z0-9_]+)\b", source))
    used = set()
    for path in [COMPOSE, DOCKERFILE, *K8S.glob("*.yaml")]:
        used |= set(re.findall(r"\b(CAPSNET_[A-Z0-9_]+)\b", path.read_text()))
    assert used <= known, f"deploy files use variables services/config.py does not know: {sorted(used - known)}"


def test_metrics_port_agrees_everywhere() -> None:
    port = mh.DEFAULT_METRICS_PORT
    assert port == 9310
    assert compose()["services"]["capsctl-worker"]["environment"]["CAPSNET_METRICS_PORT"] == str(port)
    assert k8s_doc("ConfigMap", "capsctl-config")["data"]["CAPSNET_METRICS_PORT"] == str(port)
    assert f"CAPSNET_METRICS_PORT={port}" in DOCKERFILE.read_text()
    worker = k8s_doc("Deployment", "capsctl-worker")["spec"]["template"]
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert k8s_doc("Service", "capsctl-worker-metrics")["spec"]["ports"][0]["port"] == port
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    capsctl_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "capsctl")
    assert capsctl_job["dns_sd_configs"][0]["port"] == port
    assert capsctl_job["dns_sd_configs"][0]["names"] == ["capsctl-worker"]
    ray_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_service_addresses_agree() -> None:
    c = compose()
    env = c["services"]["capsctl-worker"]["environment"]
    assert re.match(r"redis://redis:6379/\d+$", env["CAPSNET_REDIS_URL"])
    assert env["RAY_ADDRESS"] == "ray-head:6379" and "--port=6379" in c["services"]["ray-head"]["command"]
    cm = k8s_doc("ConfigMap", "capsctl-config")["data"]
    assert re.match(r"redis://redis:6379/\d+$", cm["CAPSNET_REDIS_URL"])
    k8s_doc("Service", "redis")
    ray_name = k8s_doc("RayCluster", "capsnet")["metadata"]["name"]
    assert cm["RAY_ADDRESS"] == f"{ray_name}-head-svc:6379"  # KubeRay's head Service name
    assert cm["CAPSNET_REDIS_PREFIX"] == env["CAPSNET_REDIS_PREFIX"]
    k8s_prom = yaml.safe_load(k8s_prometheus_config())
    ray_job = next(j for j in k8s_prom["scrape_configs"] if j["job_name"] == "ray")
    assert any(r.get("regex") == ray_name for r in ray_job["relabel_configs"])
    for key in ("CAPSNET_ARTIFACTS", "CAPSNET_STATE_DIR", "CAPSNET_DATA_DIR"):
        assert cm[key] == env[key] and f"{key}={env[key]}" in DOCKERFILE.read_text()


def test_image_names_and_versions_agree() -> None:
    version = pyproject_version()
    image = f"{IMAGE_REPO}:{version}"
    texts = {p: p.read_text() for p in [COMPOSE, *K8S.glob("*.yaml")]}
    refs = {ref for text in texts.values() for ref in re.findall(r"ghcr\.io/[\w./-]+(?::[\w.-]+)?", text)}
    assert refs == {image, IMAGE_REPO}  # the bare name is kustomization's images[].name
    svc = compose()["services"]
    assert svc["ray-head"]["image"] == svc["capsctl-worker"]["image"] == image
    ray = k8s_doc("RayCluster", "capsnet")["spec"]
    containers = [ray["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in ray["workerGroupSpecs"]),
                  k8s_doc("Deployment", "capsctl-worker")["spec"]["template"]["spec"]["containers"][0]]
    assert {c["image"] for c in containers} == {image}
    dockerfile = DOCKERFILE.read_text()
    assert f"-t {image} " in dockerfile
    assert f"ARG RAY_VERSION={ray['rayVersion']}" in dockerfile
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf'"{pkg}==([^"]+)"', pyproject).group(1)
        assert f"ARG {arg}={pinned}" in dockerfile
    assert 'ENTRYPOINT ["tini", "--", "capsctl"]' in dockerfile
    assert 'capsctl = "services.cli:main"' in pyproject


def test_rules_and_dashboards_only_use_defined_metrics() -> None:
    defined = m.exposed_metric_names()
    used: dict[str, set[str]] = {}
    for q in load_panel_queries():
        for name in metric_names_in(q.raw_expr):
            used.setdefault(name, set()).add(str(q))
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for name in metric_names_in(rule["expr"]):
                    used.setdefault(name, set()).add(f"{path.name}: {rule.get('alert') or rule.get('record')}")
    undefined = {n: sorted(w) for n, w in used.items() if n not in defined}
    assert not undefined, f"metric names not defined in services/metrics/worker.py: {undefined}"
    assert {n.removesuffix("_bucket") for n in used if n.endswith("_bucket")} == {
        "capsnet_job_queue_wait_seconds", "capsnet_job_run_duration_seconds", "capsnet_job_startup_seconds"}


# --------------------------------------------------------------------------- Grafana dashboards

def test_dashboards_are_valid() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) == {"capsnet-service.json", "capsnet-training.json"}
    for name, d in dashboards.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        assert d["uid"] and d["title"]
        panels = list(iter_panels(d))
        assert len(panels) >= 8, name
        for panel in panels:
            where = f"{name} / {panel.get('title')}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
                assert target["expr"].strip(), where
                assert target["refId"], where
                # multi-value/All variables only work with regex matchers
                assert not re.search(r'=\s*"\$\{?job_id', target["expr"].replace('=~', '~')), where
    job_var = next(v for v in dashboards["capsnet-training.json"]["templating"]["list"] if v["name"] == "job_id")
    assert job_var["type"] == "query" and job_var["datasource"]["uid"] == "${datasource}"
    assert re.fullmatch(r"label_values\(capsnet_\w+,\s*job_id\)", job_var["query"]["query"])
    assert metric_names_in(job_var["query"]["query"]) <= m.exposed_metric_names()
    training_exprs = [t["expr"] for p in iter_panels(dashboards["capsnet-training.json"]) for t in p["targets"]]
    per_device = [e for e in training_exprs if "capsnet_gpu_utilization_ratio" in e or "capsnet_gpu_device_memory" in e]
    assert len(per_device) == 2  # NVML's per-GPU panels belong to a node, not a job
    assert sum('job_id=~"$job_id"' in e for e in training_exprs) >= len(training_exprs) - len(per_device) - 1


def test_substitute_variables() -> None:
    expr = 'rate(x{job_id=~"$job_id", a="${other}"}[$__rate_interval]) [[job_id]] $__range ${job_id:regex}'
    assert substitute_variables(expr, {"job_id": "abc"}) == 'rate(x{job_id=~"abc", a=".*"}[30s]) abc 10m abc'
    assert substitute_variables("$__rate_interval", builtins={"__rate_interval": "1m"}) == "1m"


@pytest.mark.slow
def test_every_panel_returns_data_from_a_real_prometheus(redis_url: str, tmp_path: Path) -> None:
    """Feed every metric, scrape with a real Prometheus, run every panel's query as Grafana would."""
    registry = CollectorRegistry()
    queue = RedisQueueReadDouble(redis_url)
    registry.register(mq.QueueCollector(queue))
    registry.register(mr.RedisHealthCollector(queue.queue.client))  # the real Redis' memory and policy
    # This machine has no GPU: the NVML reader is the one part played here (the collector, the
    # exposition, Prometheus and the panels' queries are real).
    busy = iter(range(10**6))
    worker = m.WorkerMetrics(registry, gpu_reader=lambda: [
        mg.GpuSample(0, "NVIDIA H100 80GB HBM3", (next(busy) % 10) / 10, 2**33, 80 * 2**30)])
    port = mh.start_metrics_server(0, registry=registry, addr="127.0.0.1")
    job = "job-e2e"

    def activity(i: int) -> None:
        queue.set_state("queued", "normal", i % 3)
        queue.set_state("running", "normal", 1)
        queue.set_state("succeeded", "normal", i)
        queue.heartbeat("w1")
        queue.incr("submitted:train:capsnet")
        queue.incr("finished:train:capsnet:succeeded")
        if i % 2:
            queue.incr("finished:train:capsnet:failed")
            queue.incr("retries")
            queue.incr("lease_expiries")
            queue.incr("dead_lettered")
            queue.incr("manual_retries")
        worker.observe_queue_wait("train", 0.2 + i)
        worker.observe_run_duration("train", "succeeded", 3.0 + i)
        worker.observe_startup(2.0 + i % 5)
        worker.set_cluster_resources({"GPU": 1, "CPU": 8}, {"GPU": i % 2, "CPU": 4})
        worker.training.observe(job, "capsnet", {
            "type": "step", "epoch": 1 + i // 4, "step": i % 4 + 1, "steps_per_epoch": 4, "loss": 1.0 / (i + 1),
            "accuracy": 0.5 + i / 40, "lr": 1e-3, "images_per_second": 1000.0 + i})
        worker.training.observe(job, "capsnet", {
            "type": "epoch", "epoch": 1 + i // 4, "epoch_seconds": 2.5, "test_accuracy": 0.9,
            "gpu_memory_bytes": 2**30})
        worker.training.observe(job, "capsnet", {"type": "eval", "test_accuracy": {"0": 0.99, "35": 0.8 - i / 100},
                                                 "suite_accuracy": {"rotation_auc": 0.6, "affine-mnist": 0.9 - i / 100}})
        for t in range(2):  # a sweep's trials (another job: a tune job)
            worker.trials.observe(job, {"type": "trial", "trial": f"t00{t}-lenet5-shift2", "epoch": 1 + i // 4,
                                        "val_accuracy": 0.5 + t / 10 + i / 100})

    try:
        activity(0)
        with running_prometheus(tmp_path / "prom", [scrape_job("capsctl", [f"127.0.0.1:{port}"])]) as prom:
            # Keep changing values while Prometheus discovers the target (~5 s) and scrapes it a few times.
            i, deadline = 1, time.monotonic() + 30
            while not prom.query("count_over_time(capsnet_train_loss[1m]) >= 3"):
                assert time.monotonic() < deadline, prom.targets()
                time.sleep(0.4)
                activity(i)
                i += 1
            worker.training.remove(job)            # the job ends: its series go stale...
            prom.wait_for(f'capsnet_train_loss{{job_id="{job}"}}', predicate=lambda r: not r)
            assert prom.value("max(capsnet_workers_alive)") == 1

            queries = load_panel_queries(variables={"job_id": job}, builtins={"__rate_interval": "4s"})
            assert len(queries) >= 20
            empty, nan_only = [], []
            for q in queries:
                result = prom.query_range(q.expr, minutes=2, step=0.5)   # ...but stay on the graphs
                values = [float(v) for s in result for _, v in s["values"]]
                if not values:
                    empty.append(str(q))
                elif not any(math.isfinite(v) for v in values):
                    nan_only.append(str(q))
            assert not empty, "panels without data:\n" + "\n".join(empty)
            assert not nan_only, "panels with only NaN:\n" + "\n".join(nan_only)
            # the final accuracy-by-angle bar gauge is an instant query over the dashboard range
            bars = next(q for q in queries if q.panel.startswith("Accuracy by test angle"))
            assert {r["metric"]["angle"] for r in prom.query(bars.expr)} == {"0", "35"}
            suites = next(q for q in queries if q.panel == "Test suites (last value)")
            final = {r["metric"]["suite"]: float(r["value"][1]) for r in prom.query(suites.expr)}
            assert final.keys() == {"rotation_auc", "affine-mnist"} and final["rotation_auc"] == 0.6
            assert 0.9 - (i - 1) / 100 - 1e-9 <= final["affine-mnist"] <= 0.9  # the last scraped value
    finally:
        mh.stop_metrics_server(port)
