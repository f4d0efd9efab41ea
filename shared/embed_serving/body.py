"""The raw request body to a JSON value, or a `RequestError`.

The routes take the starlette `Request` alone, which makes Truss skip its own body parsing
(`json.loads`, which answers invalid UTF-8 or deep nesting with a 500); we parse with orjson,
which is also several times faster on large bodies.
"""

from __future__ import annotations

from typing import Any

import orjson

from embed_serving.errors import RequestError


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
