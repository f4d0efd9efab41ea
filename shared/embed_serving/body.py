"""The raw request body to a JSON value, or a `RequestError`, in bounded memory.

The routes take the starlette `Request` alone, which makes Truss skip its own body parsing
(`json.loads`, which answers invalid UTF-8, deep nesting or a gzip body with a 500); we read the
body ourselves, refusing it past `MAX_REQUEST_BYTES` (on the wire, `http_guard` has already
refused it before reading; this is the check where no guard runs), decompress gzip/deflate
within the same cap (a 100 kB gzip bomb can inflate to gigabytes), and parse with orjson, which
is strict (lone surrogates, invalid UTF-8, NaN, nesting past 1024 levels are errors it names)
and several times faster on large bodies.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from embed_serving.errors import RequestError, printable

# zlib's wbits for each accepted Content-Encoding: gzip framing, zlib framing.
_DECODERS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def too_big(size: str, limit: int) -> RequestError:
    return RequestError(
        f"the request body is {size} bytes, the limit is {limit} (MAX_REQUEST_BYTES); "
        "send fewer inputs per request",
        status=413,
        code="request_too_large",
    )


async def read_body(headers: Any, stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The decoded body, at most `max_bytes` long (`headers`: the request's headers)."""
    declared = headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big(declared, max_bytes)
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        decoder = None
    elif encoding in _DECODERS:
        decoder = zlib.decompressobj(wbits=_DECODERS[encoding])
    else:
        raise RequestError(
            f"Content-Encoding {printable(encoding[:40])!r} is not supported; send the body "
            "uncompressed, gzip or deflate",
            status=415,
            code="unsupported_encoding",
        )
    body = bytearray()
    wire = 0
    try:
        async for chunk in stream:
            wire += len(chunk)
            if wire > max_bytes:
                raise too_big(f"over {max_bytes}", max_bytes)
            if decoder is None:
                body += chunk
                continue
            pending = chunk
            while pending:
                # max_length: never inflate more than the cap allows, whatever the ratio.
                body += decoder.decompress(pending, max_bytes + 1 - len(body))
                if len(body) > max_bytes:
                    raise too_big(f"over {max_bytes} (decompressed)", max_bytes)
                pending = decoder.unconsumed_tail
        if decoder is not None:
            body += decoder.flush()
            if not decoder.eof:
                raise RequestError(f"the {encoding} request body is truncated", code="bad_body")
    except zlib.error:
        raise RequestError(
            f"the request body is not valid {encoding} data", code="bad_body"
        ) from None
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object", code="bad_body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestError(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
            code="invalid_json",
        ) from None
