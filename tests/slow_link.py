"""A real TCP relay that delays what a client sends: a far-away S3 on loopback."""

from __future__ import annotations

import socket
import threading
import time


class SlowLink:
    """A real TCP relay to an S3 endpoint that holds every request `delay_s` before passing it on,
    as a far-away S3 would: each GET through it takes at least `delay_s`."""

    def __init__(self, upstream_endpoint: str, delay_s: float):
        host, port = upstream_endpoint.removeprefix("http://").split(":")
        self.upstream, self.delay_s = (host, int(port)), delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=_relay, args=(client, server, self.delay_s), daemon=True).start()
            threading.Thread(target=_relay, args=(server, client, 0.0), daemon=True).start()


def _relay(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
    try:
        while data := source.recv(1 << 16):
            time.sleep(delay_s)
            sink.sendall(data)
    except OSError:
        pass  # the other direction closed both
    finally:
        source.close()
        sink.close()
