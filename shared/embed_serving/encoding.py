"""Response encoding: the embedding type (float32 or sign bits packed 8 to a byte), as JSON
numbers or base64 of the raw bytes, serialised with orjson; and the size a response will have,
estimated before any model work so that `MAX_RESPONSE_BYTES` can refuse it up front.

Truss serialises plain results with the standard `json` module, which walks every Python float;
a multi-vector page is thousands of 3072-d vectors, so we hand Truss a ready `Response` built
by orjson straight from numpy arrays instead.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from fastapi import Response


def to_numpy(vectors: Any) -> np.ndarray:
    """float32, C-contiguous, on the CPU."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)


def quantize(vector: np.ndarray, embedding_type: str) -> np.ndarray:
    """NIM's `embedding_type` of one embedding (1-D, or 2-D for multi-vector: per token).

    `ubinary`: one bit per dimension, 1 where the value is > 0, packed 8 to a uint8 with the
    first dimension in the most significant bit (numpy's `packbits`, as sentence-transformers,
    Cohere and vLLM pack it); `binary`: the same bytes as int8 (value - 128). Dimensions are
    multiples of 8 for every model here, so no padding bits occur.
    """
    if embedding_type == "float":
        return vector
    bits = np.packbits(vector > 0, axis=-1)
    if embedding_type == "ubinary":
        return bits
    return (bits.astype(np.int16) - 128).astype(np.int8)


def encode_vector(vector: np.ndarray, encoding_format: str, embedding_type: str = "float") -> Any:
    """One embedding as a JSON-ready value, in `embedding_type`.

    base64 is the raw bytes of the array in row-major order: little-endian float32 for float
    (as NIM and the OpenAI API define it), one byte per 8 dimensions for the binary types;
    multi-vector shapes are reported next to it by the caller.
    """
    array = quantize(vector, embedding_type)
    if encoding_format == "base64":
        if array.dtype == np.float32:
            array = array.astype("<f4", copy=False)
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array


# Upper bounds of the serialised size of one value: orjson writes a float32 in at most 15
# characters plus a comma ("-1.2345678e-05,"), an int8 in 5; base64 is 4/3 of the raw bytes.
_JSON_BYTES = {"float": 16, "binary": 5, "ubinary": 4}
_RAW_BYTES = {"float": 4.0, "binary": 1 / 8, "ubinary": 1 / 8}


def response_bytes(values: int, encoding_format: str, embedding_type: str) -> int:
    """Serialised bytes of `values` embedding dimensions (one vector of d dims = d values)."""
    if encoding_format == "base64":
        return int(values * _RAW_BYTES[embedding_type] * 4 / 3) + 4
    per_value = _JSON_BYTES[embedding_type] / (8 if embedding_type != "float" else 1)
    return int(values * per_value) + 4


def json_response(payload: dict[str, Any]) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content=body, media_type="application/json")
