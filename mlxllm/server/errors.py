"""Errors in each API's own shape: OpenAI's ``{"error": {...}}`` and Anthropic's
``{"type": "error", "error": {...}}``, with the status that says what went wrong."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# status -> (OpenAI error type, Anthropic error type)
_KINDS = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class ApiError(Exception):
    """An HTTP error with its message (and headers, such as ``Retry-After``)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    openai_kind, anthropic_kind = _KINDS.get(status, _KINDS[400] if status < 500 else _KINDS[500])
    body: dict[str, Any]
    if is_anthropic(path):
        body = {"type": "error", "error": {"type": anthropic_kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": openai_kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)
