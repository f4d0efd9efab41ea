"""User-facing request errors.

Validation raises `RequestError`; the service turns it into `fastapi.HTTPException(400)`, which
Truss answers as `{"error": "<message>"}`. Any other exception is a 500 whose message Truss
hides, so everything a client can get wrong must be caught as a RequestError first.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A bad request. The message names the field, the item index and the limit."""
