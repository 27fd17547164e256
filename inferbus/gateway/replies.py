"""Errors as V2 HTTP replies: the wire code is the HTTP status, ``{"error": ...}`` the body."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from inferbus.contract import MAX_ERROR_TEXT
from inferbus.errors import ConnectionFailed, RequestError
from inferbus.gateway.identities import Unauthenticated

#: the statuses a gateway answers with; any other code is a 500
STATUSES = frozenset({400, 403, 404, 413, 429, 500, 503, 504})


def error_response(error: RequestError) -> JSONResponse:
    """``error`` as its status and a V2 error body; 429 and 503 say when to retry, if known."""
    status = error.code if error.code in STATUSES else 500
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(0, math.ceil(error.retry_after_s)))
    return JSONResponse({"error": error.message[:MAX_ERROR_TEXT]}, status, headers=headers)


def refusal_response(error: Unauthenticated | ConnectionFailed) -> JSONResponse:
    """Who asked could not be connected: 401 asking for credentials when there were none or
    nats-server refused them, 503 when NATS could not be reached."""
    if isinstance(error, Unauthenticated):
        headers = {"WWW-Authenticate": 'Basic realm="inferbus"'}
        return JSONResponse({"error": str(error)}, 401, headers=headers)
    return JSONResponse({"error": str(error)}, 503)
