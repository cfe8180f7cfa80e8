"""Run the app under uvicorn with a graceful shutdown.

First SIGTERM or Ctrl-C: new requests get 503, requests in flight get up to ``--shutdown-timeout``
seconds to finish, then the server exits with code 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import uvicorn
from fastapi import FastAPI

from parallama.server.guard import is_loopback
from parallama.server.settings import Settings

log = logging.getLogger("parallama")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.draining = False

    def handle_exit(self, sig: int, frame: object) -> None:
        # Not calling super(): uvicorn would re-raise the signal after serving, and the exit code
        # would be the signal's instead of 0.
        if self.draining:
            log.warning("second signal: exiting now")
            os._exit(1)
        self.draining = True
        self.app.state.draining = True
        log.info("shutting down: finishing requests in flight (up to %.0f s)", self.shutdown_timeout)
        threading.Thread(target=self._drain, name="parallama-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        served = getattr(self.app.state, "served", None)
        while served is not None and not served.engine.is_idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.config.timeout_graceful_shutdown = max(0.5, deadline - time.monotonic())
        self.should_exit = True


def warn_if_exposed(settings: Settings) -> None:
    if not is_loopback(settings.host) and settings.resolved_api_key() is None:
        log.warning("listening on %s with no API key: anyone who can reach this port can use the model "
                    "(set --api-key or PARALLAMA_API_KEY)", settings.host)


def serve(settings: Settings) -> int:
    """Serve until a signal; 0 after a clean shutdown, 1 when the model could not be loaded or sized."""
    from parallama.server.app import create_app

    warn_if_exposed(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False)
    server = GracefulServer(config, app, settings.shutdown_timeout)
    app.state.on_load_error = lambda: setattr(server, "should_exit", True)  # fail fast, e.g. a size that cannot fit
    server.run()
    return 1 if app.state.load_error else 0
