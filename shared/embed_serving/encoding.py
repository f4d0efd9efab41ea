"""Response encoding: JSON floats or base64 float32, serialised with orjson.

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


def encode_vector(vector: np.ndarray, encoding_format: str) -> Any:
    """One embedding (1-D, or 2-D for multi-vector) as a JSON-ready value.

    base64 is the little-endian float32 bytes of the array in row-major order, as NIM and the
    OpenAI API define it; multi-vector shapes are reported next to it by the caller.
    """
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector


def json_response(payload: dict[str, Any]) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content=body, media_type="application/json")
