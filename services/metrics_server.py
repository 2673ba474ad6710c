"""A Prometheus registry served over HTTP (`/metrics`) on a background thread: the router's and
each worker replica's. prometheus-client's own server; this adds the choice of port and a stop.

    server = MetricsServer.start(registry, "127.0.0.1", 9464)          # or port 0: any free port
    server = MetricsServer.start(registry, "0.0.0.0", 9466, tries=4)   # the first free of 9466..9469
    server.port; server.stop()
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


def host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051); port -1 when `address` is not HOST:PORT."""
    host, _, port = address.rpartition(":")
    valid = port.isdigit() and int(port) <= 65535
    return host.strip("[]") or "0.0.0.0", int(port) if valid else -1


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int, tries: int = 1) -> MetricsServer:
        """Serve on the first free port of port, port + 1, ... (`tries` of them): replicas that share a
        node take consecutive ports, and a replaced replica takes its predecessor's."""
        candidate = port
        while True:
            try:
                return cls(*start_http_server(candidate, addr=host, registry=registry))
            except OSError as error:
                if error.errno != errno.EADDRINUSE or port == 0 or candidate >= port + tries - 1:
                    raise OSError(error.errno, f"cannot serve metrics on {host}:{candidate}: {error.strerror}") from None
                candidate += 1

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
