"""User-facing request errors.

Everything a client can get wrong raises `RequestError`; the route layer (`truss_model`)
answers it with `error_response`, returned rather than raised because Truss's handler drops an
exception's headers (`Retry-After` on a 429). Any other exception is a 500 whose message Truss
hides, so every client mistake must be caught as a RequestError first.

Bodies: `predict` keeps the `{"error": "<message>"}` that Truss's own handler gives; on
`/v1/embeddings` the error is OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`)
because the `openai` SDK, and every client built on it, reads `error.message` from that shape
and shows nothing but the status code otherwise.
"""

from __future__ import annotations

import reprlib
from typing import Any, Literal

import orjson
from fastapi import Response

Route = Literal["predict", "embeddings"]

# OpenAI's `type` per status: what its SDK and its users already switch on.
_ERROR_TYPES = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    503: "service_unavailable",
}


class RequestError(ValueError):
    """A bad request. The message names the field, the item index and the limit.

    `status` is the HTTP status (400 unless a cap says 413/415/429), `param` the request field
    at fault where there is one (None for the body as a whole, a cap or the server), `code` a stable
    machine-readable reason, `headers` extra response headers (`Retry-After` on 429).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


def printable(text: str) -> str:
    """`text` safe to put in a message, a log line and a UTF-8 body: a lone surrogate (which
    orjson refuses to encode) or a control character comes out escaped, as `ascii()` writes it,
    and everything else as is."""
    if text.isprintable():
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return "".join(
        c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else ascii(c)[1:-1] for c in text
    )


_SHOW = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 80, 80, 4, 4


def show(value: Any) -> str:
    """A short, printable rendering of a client's value for an error message: bounded in size
    and depth (a 1000-level nested list or a 20 MB string must not be repeated back, nor
    overflow the stack), surrogates escaped."""
    return printable(_SHOW.repr(value))


def error_body(error: RequestError, route: Route) -> dict[str, Any]:
    message = printable(error.message)
    if route == "predict":
        return {"error": message}
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: RequestError, route: Route) -> Response:
    """The response a route returns for a client error."""
    return Response(
        content=orjson.dumps(error_body(error, route)),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )
