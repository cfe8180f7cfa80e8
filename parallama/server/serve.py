"""Run the app under uvicorn with a graceful shutdown.

First SIGTERM or Ctrl-C: new requests get 503, requests in flight get up to ``--shutdown-timeout``
seconds to finish, then the server exits with code 0. A second signal exits at once.

When the deadline comes with requests still running, the engine ends each of them with an error, the
OpenAI way (a stream gets an error event and ``data: [DONE]``; a non-streaming request a 500 with an
error body), and uvicorn gets a moment to send those last bytes before it closes the connections.
Without that, uvicorn would cancel the handlers mid-stream: a traceback in the log and, for the
client, a stream that stops with no finish_reason and no ``[DONE]``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import uvicorn
from fastapi import FastAPI

from parallama.batching import Engine
from parallama.server.guard import is_loopback
from parallama.server.settings import Settings

log = logging.getLogger("parallama")

# After the deadline, once the engine has ended what was in flight: how long uvicorn gets to send those
# last chunks (already queued on the event loop) before it cancels. Docker's stop grace must cover the
# drain plus this (plus one decode step, which the engine finishes before it takes the command).
FLUSH_SECONDS = 1.5
# The engine takes the command between two decode steps, however long a step takes on a loaded machine;
# only a stuck worker (a bug) would take this long, and a second signal still exits at once.
ENGINE_ANSWER_LIMIT = 30.0


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
        engine = served.engine if served is not None else None
        if not _wait_idle(engine, deadline):
            engine.fail_all(f"the server shut down before this request finished "
                            f"(--shutdown-timeout {self.shutdown_timeout:g} s)")
            _wait_idle(engine, time.monotonic() + ENGINE_ANSWER_LIMIT)
            deadline = time.monotonic() + FLUSH_SECONDS
        # uvicorn waits this long for the responses being written before it cancels them.
        self.config.timeout_graceful_shutdown = max(0.5, deadline - time.monotonic())
        self.should_exit = True


def _wait_idle(engine: Engine | None, deadline: float) -> bool:
    """True once no request is queued or running (at once without an engine); False at the deadline."""
    while engine is not None and not engine.is_idle:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


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
