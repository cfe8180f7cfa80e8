"""The FastAPI application: routes, error shapes, and a lifespan that loads the model off the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from parallama import __version__
from parallama.server import routes_meta, routes_openai
from parallama.server.cors import Cors
from parallama.server.errors import install_error_handlers
from parallama.server.guard import Guard
from parallama.server.metrics import metrics_of
from parallama.server.settings import Settings
from parallama.server.state import Served

log = logging.getLogger(__name__)

Builder = Callable[[Settings], Served]

WEB = Path(__file__).parent / "web"
# The page loads only its own files and talks only to this server: no inline script, no remote
# anything. A second fence behind the page's own escaping of model and user text.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(settings: Settings, build: Builder | None = None) -> FastAPI:
    """``build`` loads the model and starts the engine (``runtime.build`` unless a test injects one).
    It runs in a thread, so /health answers 503 while the model loads."""
    if build is None:
        from parallama.server.runtime import build

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.served = None
        app.state.load_error = None
        loading = asyncio.create_task(_load(app, settings, build))
        try:
            yield
        finally:
            loading.cancel()
            if app.state.served is not None:
                await asyncio.to_thread(app.state.served.engine.shutdown)

    app = FastAPI(title="parallama", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.draining = False
    app.add_middleware(
        Guard,
        api_key=settings.resolved_api_key(),
        bind_host=settings.host,
        allowed_hosts=frozenset(settings.allowed_hosts),
        max_body_bytes=settings.max_body_bytes,
        draining=lambda: app.state.draining,
        on_refusal=lambda status, code: metrics_of(app).count_error(status, code),
    )
    app.add_middleware(Cors, origins=settings.cors_origins)  # added last, so it runs first: before the key
    install_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_meta.router)
    _serve_page(app)
    return app


def _serve_page(app: FastAPI) -> None:
    """GET / is the chat page; its scripts and styles are under /web/ (no key needed: see guard.py)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)

    app.mount("/web", StaticFiles(directory=WEB), name="web")


async def _load(app: FastAPI, settings: Settings, build: Builder) -> None:
    try:
        app.state.served = await asyncio.to_thread(build, settings)
    except Exception as exc:
        app.state.load_error = str(exc)
        log.error("could not start: %s", exc)
        on_error = getattr(app.state, "on_load_error", None)
        if on_error is not None:
            on_error()
