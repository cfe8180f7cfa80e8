"""A real parallama server on a free loopback port, in a background thread, for HTTP tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from parallama.server.app import create_app
from parallama.server.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int) -> None:
        self.app = app
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout: float = 120.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("the server did not become healthy")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    @property
    def served(self):
        return self.app.state.served


@contextlib.contextmanager
def live_server(probe=None, **overrides) -> Iterator[LiveServer]:
    """``probe`` replaces the system memory probe, to script memory pressure."""
    from parallama.server.runtime import build

    settings = Settings(port=free_port(), **{"parallel": 8, "ctx_size": 512, **overrides})
    server = LiveServer(create_app(settings, lambda s: build(s, probe)), settings.port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
