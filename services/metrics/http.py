"""The HTTP exporter: serves a Prometheus registry at ``/metrics`` from a daemon thread (each
``capsctl worker`` on ``DEFAULT_METRICS_PORT``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

DEFAULT_METRICS_PORT = 9310

_servers: dict[int, Any] = {}


def start_metrics_server(port: int = DEFAULT_METRICS_PORT, registry: CollectorRegistry = REGISTRY,
                         addr: str = "127.0.0.1") -> int:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread; returns the bound port.

    ``port=0`` lets the OS pick a free port. ``addr`` defaults to loopback (the workers pass
    ``CAPSNET_METRICS_ADDR``): on one machine nothing else needs to reach it; a cluster's
    Prometheus scrapes ``0.0.0.0``, which deploy/ sets.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    _servers[bound] = server
    return bound


def stop_metrics_server(port: int) -> None:
    """Stop a server started by :func:`start_metrics_server` (no-op if unknown)."""
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
