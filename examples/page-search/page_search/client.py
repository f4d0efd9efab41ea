"""The colembed deployment, over HTTP: page images and queries in, multi-vectors and MUVERA
fixed-dimensional encodings (FDE) out, with retries that honour the server's back-pressure.

One request asks for both outputs (`fde` beside the multi-vectors, base64-encoded: float32
bytes travel at 4/3 of their size instead of ~15 characters per number in JSON). Retried:
429 (queue full) and 503 (overloaded or restarting) after their `Retry-After`; 502/504 and
connection errors after an exponential backoff. Any other answer is final.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 300.0


def predict_url(model_id: str, environment: str = "production") -> str:
    return f"https://model-{model_id}.api.baseten.co/environments/{environment}/predict"


@dataclass(frozen=True)
class FdeParams:
    """MUVERA parameters; the defaults are fastembed's `Muvera` defaults (and the server's).
    Queries and pages must be encoded with the same ones, so the index records them."""

    k_sim: int = 5
    dim_proj: int = 16
    r_reps: int = 20
    seed: int = 42

    @property
    def dim(self) -> int:
        return self.r_reps * 2**self.k_sim * self.dim_proj


@dataclass
class Embedding:
    vectors: np.ndarray  # (tokens, dim) float32, L2-normalised rows (pooled if asked)
    fde: np.ndarray  # (FdeParams.dim,) float32


class Rejected(Exception):
    """The server refused the request for good (a 4xx other than 429, or a 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    @property
    def about_the_request(self) -> bool:
        """True when the content was refused (another page may pass); False when no request
        can succeed (wrong URL, key, or a deployment without FDE output)."""
        return self.status not in (401, 403, 404, 405)


class Incompatible(Exception):
    """The deployment answered without what this tool needs (e.g. no FDE output)."""


class ColembedClient:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        fde: FdeParams,
        *,
        pool_factor: int | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 8,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
        self.url, self.fde, self.pool_factor, self.max_retries = url, fde, pool_factor, max_retries
        self.retries = 0  # how many times a request was retried, for the run's summary
        self.on_retry = on_retry
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    async def close(self) -> None:
        await self._http.aclose()

    async def embed_pages(self, images: list[bytes]) -> list[Embedding]:
        passages = [{"type": "image", "content": base64.b64encode(b).decode()} for b in images]
        body = {"passages": passages, **self._common(passages=True)}
        return _decode(await self._post(body), "passage", len(images))

    async def preflight(self) -> None:
        """One tiny request with every setting of the run (text, no image): a wrong URL or
        key, a deployment without FDE output, or FDE parameters / a pool factor the server
        refuses fail here, once, instead of on every page."""
        body = {"queries": ["preflight"], "passages": ["preflight"], **self._common(passages=True)}
        payload = await self._post(body)
        _decode(payload, "query", 1)
        _decode(payload, "passage", 1)

    async def embed_query(self, text: str) -> Embedding:
        return _decode(await self._post({"queries": [text], **self._common()}), "query", 1)[0]

    def _common(self, passages: bool = False) -> dict[str, Any]:
        common: dict[str, Any] = {"encoding_format": "base64", "fde": asdict(self.fde)}
        if passages and self.pool_factor and self.pool_factor > 1:
            common["pool_factor"] = self.pool_factor  # queries are never pooled
        return common

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            try:
                r = await self._http.post(self.url, json=body)
            except httpx.TransportError as e:
                if attempt == self.max_retries:
                    raise
                wait, reason = _backoff(attempt), f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    raise Rejected(r.status_code, _error_text(r))
                # Honoured, within reason: a proxy's "come back in an hour" is not waited out.
                wait = min(_retry_after(r) or _backoff(attempt), MAX_RETRY_AFTER_S)
                reason = f"HTTP {r.status_code}"
            self.retries += 1
            if self.on_retry:
                self.on_retry(f"{reason}; retrying in {wait:.1f} s")
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")


def _decode(payload: dict[str, Any], kind: str, n: int) -> list[Embedding]:
    vectors = payload.get(f"{kind}_embeddings")
    shapes = payload.get(f"{kind}_embedding_shapes")
    fdes = payload.get(f"{kind}_fde")
    if fdes is None:
        raise Incompatible(
            f"the response has no {kind}_fde: this deployment does not serve FDE output "
            "(colembed-3b from this repository does)"
        )
    if vectors is None or shapes is None or len(vectors) != n or len(fdes) != n:
        raise Incompatible(f"expected {n} {kind} embeddings with shapes and FDEs")
    return [
        Embedding(_floats(v).reshape(shape), _floats(f))
        for v, shape, f in zip(vectors, shapes, fdes, strict=True)
    ]


def _floats(value: str | list[float]) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _retry_after(r: httpx.Response) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date (RFC 9110 allows both)."""
    value = r.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _backoff(attempt: int) -> float:
    # Full jitter, so that concurrent workers that failed together do not retry together.
    return random.uniform(0, min(MAX_BACKOFF_S, 0.5 * 2**attempt))


def _error_text(r: httpx.Response) -> str:
    try:
        error = r.json().get("error", r.text)
    except ValueError:
        return r.text[:500]
    if isinstance(error, dict):  # the OpenAI shape of /v1/embeddings
        error = error.get("message", error)
    return str(error)[:500]
