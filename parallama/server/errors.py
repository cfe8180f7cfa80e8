"""One error taxonomy, mapped once to OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallama.server.metrics import metrics_of

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    code = "unsupported_parameter"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(APIError):
    status = 503
    type = "server_error"
    code = "server_is_overloaded"


class NotReady(APIError):
    status = 503
    type = "server_error"
    code = "model_loading"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Parts of a pydantic error location that name a union member or a validator, not a field.
_TAG = re.compile(r"^(str|int|float|bool|none|[a-z]+\[.*|[a-z]+-[a-z].*)$")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc[1:] if not _TAG.match(str(p))] if loc[:1] == ("body",) else []
    return ".".join(parts) or None


def _answer(request: Request, body: dict, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every handled error leaves through here, so /metrics counts refusals (503) and bad requests (4xx)."""
    metrics_of(request.app).count_error(status, body["error"]["code"])
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _answer(request, exc.body(), exc.status, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param_of(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return _answer(request, error_body(message, "invalid_request_error", param, "invalid_value"), 400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, APIError):  # FastAPI wraps errors raised while it reads the body
        return await _api_error(request, exc.__cause__)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    body = error_body(str(exc.detail), type_, None, codes.get(exc.status_code))
    return _answer(request, body, exc.status_code, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
