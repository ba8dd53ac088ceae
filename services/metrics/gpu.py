"""Per-GPU utilisation and memory of a worker's node, read from NVML at scrape time.

NVML comes from ``nvidia-ml-py`` (``pynvml``). On a machine without an NVIDIA driver (or without
the package) the collector exports nothing and says so once in the log: a CPU worker is not an
error. The reader is a parameter so the exposition and the dashboards can be checked end to end
on a CPU machine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UTILIZATION = "capsnet_gpu_utilization_ratio"
DEVICE_MEMORY_USED = "capsnet_gpu_device_memory_used_bytes"
DEVICE_MEMORY_TOTAL = "capsnet_gpu_device_memory_total_bytes"


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization: float  # 0..1: share of the last sample period a kernel ran (NVML's gpu utilisation)
    memory_used_bytes: int
    memory_total_bytes: int


class NvmlReader:
    """Reads every GPU through NVML; initialised on first use, and never retried after it failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml = None
        self._unavailable: str | None = None

    def _init(self) -> object | None:
        if self._nvml is not None or self._unavailable is not None:
            return self._nvml
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no package, no driver, no device: a CPU machine
            self._unavailable = f"{type(exc).__name__}: {exc}".strip()
            log.info("no GPU metrics on this node (NVML unavailable: %s)", self._unavailable)
        return self._nvml

    @property
    def unavailable(self) -> str | None:
        """Why NVML could not be used (after the first read), or None."""
        return self._unavailable

    def __call__(self) -> list[GpuSample]:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return []
            samples = []
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    name = nvml.nvmlDeviceGetName(handle)
                    samples.append(GpuSample(index, name.decode() if isinstance(name, bytes) else str(name),
                                             rates.gpu / 100.0, int(memory.used), int(memory.total)))
            except Exception as exc:  # a GPU fell off the bus mid-scrape: export what was read
                log.warning("reading GPU metrics failed: %s", exc)
            return samples


class GpuCollector(Collector):
    """``capsnet_gpu_utilization_ratio`` and device memory per GPU (label ``gpu`` = NVML index)."""

    def __init__(self, reader: Callable[[], list[GpuSample]] | None = None) -> None:
        self.reader = reader if reader is not None else NvmlReader()

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(UTILIZATION, "Share of the last sample period a GPU ran a kernel (NVML), 0..1.",
                                  labels=["gpu", "device"]),
                GaugeMetricFamily(DEVICE_MEMORY_USED, "GPU memory in use on the device, all processes (NVML).",
                                  labels=["gpu", "device"]),
                GaugeMetricFamily(DEVICE_MEMORY_TOTAL, "GPU memory on the device (NVML).", labels=["gpu", "device"]))

    def collect(self) -> Iterator[Metric]:
        samples = self.reader()
        if not samples:
            return
        utilization, used, total = self._families()
        for s in samples:
            labels = [str(s.index), s.name[:64]]
            utilization.add_metric(labels, s.utilization)
            used.add_metric(labels, float(s.memory_used_bytes))
            total.add_metric(labels, float(s.memory_total_bytes))
        yield from (utilization, used, total)
