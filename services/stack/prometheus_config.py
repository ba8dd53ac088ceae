"""A Prometheus configuration for the stack ``capsctl up`` started: its workers' /metrics and the
service-discovery file of its own Ray (under the stack's Ray temp dir, never another user's
``/tmp/ray``). Run ``prometheus --config.file=<state_dir>/prometheus.yml`` beside the stack."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "prometheus.yml"
RAY_SD_FILE = "prom_metrics_service_discovery.json"


def prometheus_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The scrape configuration for ``record`` (the stack file): workers every 5 s, Ray's nodes
    through the discovery file its head rewrites in its temp dir."""
    targets = [f"127.0.0.1:{w['metrics_port']}" for w in record.get("workers") or [] if w.get("metrics_port")]
    scrape: list[dict[str, Any]] = [{"job_name": "capsctl", "scrape_interval": "5s",
                                     "static_configs": [{"targets": targets}]}]
    ray = record.get("ray") or {}
    if ray.get("started") and ray.get("temp_dir"):
        scrape.append({"job_name": "ray", "file_sd_configs": [{"files": [str(Path(ray["temp_dir"]) / RAY_SD_FILE)]}]})
    return {"global": {"scrape_interval": "15s", "evaluation_interval": "15s",
                       "external_labels": {"service": "capsctl"}},
            "scrape_configs": scrape}


def write_prometheus_config(state_dir: Path, record: Mapping[str, Any]) -> Path:
    path = Path(state_dir) / CONFIG_FILE
    path.write_text("# Written by `capsctl up` for this stack: prometheus --config.file=" + str(path) + "\n"
                    + yaml.safe_dump(prometheus_config(record), sort_keys=False))
    return path
