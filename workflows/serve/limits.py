"""Request limits and error bodies for HTTP services: a body-size ASGI middleware (413),
validation helpers (400), overload answers (503 with ``Retry-After``) and a JSON 500.

Pure (no Ray, no model). :class:`RequestError` carries the HTTP status, the offending field and
any headers; the app turns it into an OpenAI-style error body with :func:`error_body`. Every
status a service answers, 500 included, carries that JSON body (:func:`install_error_handlers`).
Hand-written body limit because Starlette/uvicorn have none per app: it checks
``Content-Length`` first and also counts streamed (chunked) bodies.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from embedforge.errors import InputError

log = logging.getLogger(__name__)


class RequestError(InputError):
    """A request the server refuses, with the HTTP status to answer and the field at fault."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def __reduce__(self):  # keep status/param/code/headers when Ray ships the error between replicas
        return (type(self), (self.message, self.status_code, self.param, self.code, self.headers))


def overloaded(reason: str, retry_after_s: float = 1.0, code: str = "overloaded") -> RequestError:
    """A 503 with ``Retry-After`` (whole seconds, rounded up, as RFC 9110 asks)."""
    seconds = max(1, math.ceil(retry_after_s))
    return RequestError(f"server overloaded: {reason}; retry after {seconds} s", status_code=503, code=code,
                        headers={"Retry-After": str(seconds)})


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "server_overloaded"}


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status_code, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
    """A JSONResponse with :func:`error_body`."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class InternalErrorMiddleware:
    """ASGI middleware: an unhandled exception becomes a logged JSON 500 in OpenAI's error shape.

    Starlette's own last-resort handler answers plain text; this one sits inside it and answers
    first. The message names the exception type only (details go to the log, not to callers).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the last resort: log it and answer JSON
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for another status line; the connection closes on the error
                raise
            body = json.dumps(error_body(500, f"internal server error ({type(e).__name__}); the server logged "
                                              "the details", code="internal_error")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: Any, validation_status: int = 400) -> None:
    """OpenAI-style error bodies for schema errors (``validation_status``), HTTP errors, RequestError
    (with its headers, e.g. ``Retry-After``) and any unhandled exception (500)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def where(e: dict) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        messages = "; ".join(f"{where(e)}: {e.get('msg')}" for e in errors[:5])
        param = where(errors[0]) if errors else ""
        return error_response(validation_status, f"invalid request: {messages}", param or None, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Any, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestError)
    async def _refused(request: Any, exc: RequestError) -> Any:
        return error_response(exc.status_code, exc.message, exc.param, exc.code, headers=exc.headers or None)

    app.add_middleware(InternalErrorMiddleware)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """ASGI middleware answering 413 when a request body exceeds ``max_body_bytes``."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(413, f"request body exceeds {self.max_body_bytes} bytes; send fewer or "
                                          "shorter inputs", code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._reject(send)
                    return
        seen = 0
        too_large = False
        replied = False

        async def limited_receive() -> dict:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            # Frameworks may turn the read error into their own answer (FastAPI: 400); replace it.
            nonlocal replied
            if too_large:
                if not replied and message["type"] == "http.response.start":
                    replied = True
                    await self._reject(send)
                return
            replied = replied or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not replied:
                await self._reject(send)


def check_range(param: str, value: int | None, low: int, high: int, what: str = "") -> None:
    """400 naming ``param`` and the allowed range when ``value`` is outside [low, high]."""
    if value is not None and not low <= value <= high:
        raise RequestError(f"{param}={value} is out of range for {what or 'this model'}: allowed {low}..{high}",
                           param=param, code="out_of_range")


def check_inputs(inputs: Sequence[str] | Sequence[Sequence[int]], max_inputs: int) -> None:
    """400 for an empty list, too many inputs, or empty strings (OpenAI rejects those too).

    ``inputs``: texts, or token-id sequences (their ids are checked against the vocabulary where
    the tokenizer is, :func:`check_token_ids`).
    """
    if not inputs:
        raise RequestError("input must not be empty: send a string, a non-empty list of strings or token ids",
                           param="input")
    if len(inputs) > max_inputs:
        raise RequestError(f"input has {len(inputs)} items; at most {max_inputs} per request (split the request)",
                           param="input", code="too_many_inputs")
    for i, t in enumerate(inputs):
        if not isinstance(t, str):
            if not t:
                raise RequestError(f"input[{i}] is an empty token list", param="input")
            continue
        if not t:
            raise RequestError(f"input[{i}] is an empty string; every input must contain text", param="input")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800") are valid JSON but not text
            raise RequestError(f"input[{i}] is not valid Unicode text (lone surrogate)", param="input") from None


def check_token_lengths(lengths: Sequence[int], max_tokens: int) -> None:
    """400 naming the first input longer than ``max_tokens`` (for ``long_inputs: reject``)."""
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise RequestError(f"input[{i}] has {n} tokens; this server embeds at most {max_tokens} tokens per input "
                               "(shorten or split it, or run the server with limits.long_inputs=truncate)",
                               param="input", code="input_too_long")


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str = "this model") -> None:
    """400 naming the first token id outside ``0..vocab_size-1``."""
    for i, row in enumerate(rows):
        top = max(row)
        if top >= vocab_size or min(row) < 0:
            j = next(j for j, x in enumerate(row) if not 0 <= x < vocab_size)
            raise RequestError(f"input[{i}][{j}] = {row[j]} is not a token id of {what}: ids are 0..{vocab_size - 1} "
                               "(tokenize with the served model's tokenizer)", param="input", code="invalid_token_id")
