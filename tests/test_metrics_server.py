"""services/metrics_server.py: a registry served over HTTP, on the first free port of a range."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.metrics_server import MetricsServer, host_port
from tests.adapters_store.helpers import free_port


def registry_with(name: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter(name, "a test counter", registry=registry).inc()
    return registry


def test_replicas_sharing_a_node_take_consecutive_ports_then_a_busy_range_is_one_clear_error():
    base = free_port()
    first = MetricsServer.start(registry_with("first"), "127.0.0.1", base, tries=2)
    second = MetricsServer.start(registry_with("second"), "127.0.0.1", base, tries=2)
    try:
        assert (first.port, second.port) == (base, base + 1)
        assert b"second_total 1.0" in urllib.request.urlopen(f"http://127.0.0.1:{second.port}/metrics", timeout=5).read()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{base + 1}: "):
            MetricsServer.start(registry_with("third"), "127.0.0.1", base, tries=2)
    finally:
        first.stop()
        second.stop()


def test_port_zero_takes_any_free_port():
    server = MetricsServer.start(registry_with("any"), "127.0.0.1", 0)
    try:
        assert server.port > 0
    finally:
        server.stop()


def test_host_port():
    assert host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert host_port("[::1]:9") == ("::1", 9)
    assert host_port(":9464") == ("0.0.0.0", 9464)
    assert host_port("localhost") == ("0.0.0.0", -1)
