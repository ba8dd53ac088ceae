"""Per-GPU metrics from NVML: absent, not an error, on this CPU machine; exported per device when read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.metrics import gpu as mg
from services.metrics import worker as m
from services.metrics.gpu import NvmlReader


def test_a_cpu_node_exports_no_gpu_series_and_says_why_once() -> None:
    reader = NvmlReader()
    registry = CollectorRegistry()
    m.WorkerMetrics(registry, gpu_reader=reader)
    text = generate_latest(registry).decode()  # a scrape: must not raise
    assert "capsnet_gpu_utilization_ratio{" not in text and "capsnet_gpu_device_memory_used_bytes{" not in text
    assert reader.unavailable  # the real NVML was tried: this machine has no NVIDIA driver
    assert reader() == [] and generate_latest(registry)  # and stays quiet afterwards


def test_each_device_is_one_series_per_gauge() -> None:
    samples = [mg.GpuSample(0, "NVIDIA H200", 0.87, 30 * 2**30, 141 * 2**30),
               mg.GpuSample(1, "NVIDIA H200", 0.0, 2**20, 141 * 2**30)]
    registry = CollectorRegistry()
    m.WorkerMetrics(registry, gpu_reader=lambda: samples)
    values = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("capsnet_gpu_") and "gpu" in sample.labels:
                values[(sample.name, sample.labels["gpu"])] = sample.value
    assert values[("capsnet_gpu_utilization_ratio", "0")] == 0.87
    assert values[("capsnet_gpu_device_memory_used_bytes", "1")] == 2**20
    assert values[("capsnet_gpu_device_memory_total_bytes", "0")] == 141 * 2**30
    assert len(values) == 6
