"""The door: API key, Host header (DNS-rebinding defence), body size and content type, draining.

A pure ASGI middleware, so streaming responses pass through untouched. Every refusal is an
OpenAI-shaped error.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from parallama.server.errors import PayloadTooLarge, error_body

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
OPEN_PATHS = frozenset({"/health", "/"})  # "/" is the web page: it must load to ask for the key
OPEN_PREFIXES = ("/web/",)  # the page's static files; every API call it makes still needs the key


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:8000
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    def __init__(self, app: Any, *, api_key: str | None, bind_host: str, allowed_hosts: frozenset[str],
                 max_body_bytes: int, draining: Any, on_refusal: Any = None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.check_host = is_loopback(bind_host)
        self.allowed_hosts = LOOPBACK_NAMES | allowed_hosts
        self.max_body_bytes = max_body_bytes
        self.draining = draining  # callable: True once shutdown has begun
        self.on_refusal = on_refusal  # callable(status, error code): /metrics counts the refusals

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            if self.on_refusal is not None:
                self.on_refusal(refusal[0], refusal[1]["error"]["code"])
            await _respond(send, *refusal)
            return
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, scope: dict) -> tuple[int, dict, dict[str, str]] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.check_host and _host_name(headers.get("host", "")).lower() not in self.allowed_hosts:
            return 403, error_body("Host header not allowed for a server bound to loopback; see --allowed-hosts",
                                   "invalid_request_error", None, "host_not_allowed"), {}
        if self.api_key and not _is_open(path) and not self._authorized(headers.get("authorization", "")):
            return 401, error_body("Incorrect API key provided.", "invalid_request_error", None,
                                   "invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return 413, _too_large(self.max_body_bytes), {}
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return 400, error_body("Content-Type must be application/json", "invalid_request_error", None,
                                       "invalid_content_type"), {}
            if self.draining():
                return 503, error_body("the server is shutting down", "server_error", None,
                                       "server_is_overloaded"), {"Retry-After": "5"}
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    def _limited(self, receive: Any) -> Any:
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # a chunked body with no Content-Length
                    raise PayloadTooLarge(_too_large(self.max_body_bytes)["error"]["message"])
            return message

        return limited_receive


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _too_large(limit: int) -> dict:
    return error_body(f"request body exceeds {limit} bytes", "invalid_request_error", None, "request_too_large")


async def _respond(send: Any, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
