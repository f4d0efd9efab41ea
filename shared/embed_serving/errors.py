"""User-facing request errors.

Everything a client can get wrong raises `RequestError`; the route layer (`truss_model`)
answers it with `error_response`: the `{"error": <detail>}` body Truss's own handler would give
an `HTTPException`, but returned rather than raised, because Truss's handler drops the
exception's headers (`Retry-After` on a 429). Any other exception is a 500 whose message Truss
hides, so every client mistake must be caught as a RequestError first.
"""

from __future__ import annotations

from typing import Literal

import orjson
from fastapi import Response

Route = Literal["predict", "embeddings"]


class RequestError(ValueError):
    """A bad request. The message names the field, the item index and the limit.

    `status` is the HTTP status (400 unless a cap says 413/415/429), `param` the request field
    at fault where there is one, `headers` extra response headers (`Retry-After` on 429).
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


def error_response(error: RequestError, route: Route) -> Response:
    """The response a route returns for a client error."""
    return Response(
        content=orjson.dumps({"error": error.message}),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )
