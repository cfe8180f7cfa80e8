"""CORS for the origins named in --cors-origins, and for no others.

A pure ASGI middleware placed outside the Guard: a browser's preflight (OPTIONS) never carries the
API key, so it is answered here, before the key check; the real request that follows still goes
through the Guard and needs the key. Every response to an allowed origin (errors and SSE streams
included) gets Access-Control-Allow-Origin, so the page on that origin can read it.
"""

from __future__ import annotations

import json
from typing import Any

from parallama.server.errors import error_body

ANY_ORIGIN = "*"
ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"authorization, content-type"
EXPOSE_HEADERS = b"retry-after"  # the page waits as long as a 503 asks
MAX_AGE = b"600"


class Cors:
    def __init__(self, app: Any, *, origins: list[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    def allowed(self, origin: str) -> bool:
        return bool(origin) and (ANY_ORIGIN in self.origins or origin.rstrip("/").lower() in self.origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if scope["method"] == "OPTIONS" and origin and b"access-control-request-method" in headers:
            await self._preflight(send, origin)
            return
        if not self.allowed(origin):
            await self.app(scope, receive, send)  # same-origin or unknown: untouched, no CORS headers
            return

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_vary(),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"access-control-expose-headers", EXPOSE_HEADERS)]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Any, origin: str) -> None:
        if not self.allowed(origin):
            body = json.dumps(error_body("CORS origin not allowed; see --cors-origins", "invalid_request_error",
                                         None, "origin_not_allowed")).encode()
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *_vary()]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", MAX_AGE), *_vary()]})
        await send({"type": "http.response.body", "body": b""})


def _vary() -> list[tuple[bytes, bytes]]:
    return [(b"vary", b"Origin")]  # caches must not hand one origin's answer to another
