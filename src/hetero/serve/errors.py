"""Every failure answers as an OpenAI error object: {"error": {message, type, param, code}}."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetero.serve.schemas import APIError, error_body
from hetero.serve.waiting import ClientGone


async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _client_gone(request: Request, e: ClientGone):
    return PlainTextResponse("", status_code=499)  # nobody reads it; nginx's "client closed request"


async def _http_error(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", code=code),
                        status_code=e.status_code)


async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(error_body(f"invalid request: {e.errors()}"), status_code=400)


async def _unexpected(request: Request, e: Exception):
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
