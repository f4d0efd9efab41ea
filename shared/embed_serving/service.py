"""The request pipeline shared by the three packages: validate, fetch images, tokenise and
truncate (off the event loop), embed (through the engine), score, encode.

Everything here runs per request; the device belongs to the engine (`engine.py`), which batches
the inputs of all requests together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from fastapi import Response

from embed_serving import fde, pooling, scoring
from embed_serving.backend import Backend, Prepared, truncate_prepared
from embed_serving.budget import Budget
from embed_serving.encoding import (
    encode_vector,
    json_response,
    quantize,
    response_bytes,
    to_numpy,
)
from embed_serving.engine import ClientGone, Engine, EngineLimits
from embed_serving.errors import RequestError
from embed_serving.images import ImageInputError, ImageSource, process_images
from embed_serving.request import EmbedRequest, Item, Kind, parse_embeddings, parse_predict
from embed_serving.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
Disconnected = Callable[[], Awaitable[bool]]

# Below these sizes the work is cheaper than a hop to the pool and back (~0.1 ms), so it runs
# inline; above them it would hold the event loop (and every other request) for longer.
INLINE_TEXT_CHARS = 4096
INLINE_OUTPUT_FLOATS = 1 << 16


@dataclass
class Embedded:
    vectors: list[torch.Tensor]  # per input, input order, CPU float32 (pooled if asked)
    tokens: int
    fde: torch.Tensor | None = None  # (inputs, FDE dimensions) CPU float32, when asked


class EmbeddingService:
    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self.caps = backend.caps
        self.engine = Engine(
            backend,
            EngineLimits(
                batch_max_items=settings.batch_max_items,
                batch_max_tokens=settings.batch_max_tokens,
                max_queue_tokens=settings.max_queue_tokens,
            ),
        )
        # Tokenising, tiling and encoding big responses: bounded, and off the event loop.
        self._pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="prepare")
        # Server-wide image budgets (see `_reserve_image_memory` and README "Image memory"):
        # decoded pixels in flight, and downloads in flight + tiles held, over all requests.
        images = settings.images
        self._image_pixels = Budget(images.decode_budget_pixels, "IMAGE_DECODE_BUDGET_PIXELS")
        self._image_memory = Budget(images.memory_budget_bytes, "IMAGE_MEMORY_BUDGET_BYTES")
        if self.caps.supports_images:
            one = images.max_bytes + backend.max_image_tile_bytes()
            if one > images.memory_budget_bytes:
                raise ValueError(
                    f"setting IMAGE_MEMORY_BUDGET_BYTES={images.memory_budget_bytes} is below one "
                    f"image's worst case, {one} (IMAGE_MAX_BYTES + its tiles)"
                )

    def close(self) -> None:
        self.engine.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- routes -------------------------------------------------------------------------

    async def predict(self, body: Any, disconnected: Disconnected | None = None) -> Response:
        req = parse_predict(body, self.caps, self.settings)
        labels = {
            "query": "query" if "query" in body else "queries",
            "passage": "documents" if "documents" in body else "passages",
        }
        results = await self._embed_request(req, labels, disconnected)
        scores = None
        if req.compute_scores:
            queries, passages = results["query"].vectors, results["passage"].vectors
            scores = await self._on_device(lambda: self._scores(queries, passages))
        return await self._respond(self._predict_payload, req, results, scores)

    async def embeddings(self, body: Any, disconnected: Disconnected | None = None) -> Response:
        req = parse_embeddings(body, self.caps, self.settings)
        labels = {"query": "input", "passage": "input"}
        results = await self._embed_request(req, labels, disconnected)
        (embedded,) = results.values()
        model = body.get("model") or self.caps.name
        return await self._respond(self._embeddings_payload, req, embedded, model)

    def _predict_payload(
        self, req: EmbedRequest, results: dict[str, Embedded], scores: torch.Tensor | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.caps.name}
        for kind, key in (("query", "query_embeddings"), ("passage", "passage_embeddings")):
            if kind in results and req.return_embeddings:
                vectors = [quantize(to_numpy(v), req.embedding_type) for v in results[kind].vectors]
                payload[key] = [encode_vector(v, req.encoding_format) for v in vectors]
                if self.caps.multi_vector and req.encoding_format == "base64":
                    # The shape of what the bytes hold (tokens x bytes for the binary types).
                    payload[key.replace("embeddings", "embedding_shapes")] = [
                        list(v.shape) for v in vectors
                    ]
            if kind in results and results[kind].fde is not None:
                fdes = quantize(to_numpy(results[kind].fde), req.embedding_type)
                payload[f"{kind}_fde"] = [encode_vector(v, req.encoding_format) for v in fdes]
        if scores is not None:
            payload["scores"] = to_numpy(scores)
            if req.top_k is not None:
                payload["top_k"] = scoring.top_k_indices(scores, req.top_k)
        tokens = sum(r.tokens for r in results.values())
        payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return payload

    def _embeddings_payload(
        self, req: EmbedRequest, embedded: Embedded, model: str
    ) -> dict[str, Any]:
        data = []
        fdes = None
        if embedded.fde is not None:
            fdes = quantize(to_numpy(embedded.fde), req.embedding_type)
        for i, vector in enumerate(embedded.vectors):
            entry: dict[str, Any] = {"object": "embedding", "index": i}
            if req.return_embeddings:
                array = quantize(to_numpy(vector), req.embedding_type)
                entry["embedding"] = encode_vector(array, req.encoding_format)
                if self.caps.multi_vector:
                    entry["shape"] = list(array.shape)
            if fdes is not None:
                entry["fde"] = encode_vector(fdes[i], req.encoding_format)
            data.append(entry)
        usage = {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}
        return {"object": "list", "data": data, "model": model, "usage": usage}

    async def _respond(self, build: Callable[..., dict[str, Any]], *args: Any) -> Response:
        """Build and serialise the response; off the loop when it is big (a page of
        multi-vectors is megabytes of JSON)."""
        floats = sum(v.numel() for a in args if isinstance(a, Embedded | dict) for v in _vectors(a))
        if floats <= INLINE_OUTPUT_FLOATS:
            return json_response(build(*args))
        return await self._in_pool(lambda: json_response(build(*args)))

    # ---- pipeline -----------------------------------------------------------------------

    async def _embed_request(
        self, req: EmbedRequest, labels: dict[str, str], disconnected: Disconnected | None
    ) -> dict[str, Embedded]:
        # Image memory is reserved at the request's worst case before anything is fetched, and
        # held until its tiles are dropped, so the total over all requests stays bounded.
        reserved = await self._reserve_image_memory(req.passages, labels["passage"], disconnected)
        try:
            return await self._embed_items(req, labels, disconnected)
        finally:
            for item in req.passages:
                item.pixel_values = None  # the request object outlives this call
            if reserved:
                self._image_memory.release(reserved)

    async def _embed_items(
        self, req: EmbedRequest, labels: dict[str, str], disconnected: Disconnected | None
    ) -> dict[str, Embedded]:
        self.engine.check_room(len(req.queries) + len(req.passages))
        await self._load_images(req.passages, labels["passage"])
        chars = sum(len(item.text or "") for item in req.queries + req.passages)
        if chars <= INLINE_TEXT_CHARS and not any(i.image for i in req.passages):
            prepared = self._prepare(req, labels)
        else:
            prepared = await self._in_pool(lambda: self._prepare(req, labels))
        self._check_response_size(req, prepared)
        # One engine job for the whole request: queries and passages may share micro-batches.
        inputs = [p for kind in prepared for p in prepared[kind]]
        try:
            outputs = await self.engine.embed(inputs, req.batch_size, disconnected)
        except ClientGone:
            raise RequestError("the client disconnected", status=499) from None
        results: dict[str, Embedded] = {}
        start = 0
        for kind, items in prepared.items():
            vectors = outputs[start : start + len(items)]
            start += len(items)
            if req.dimensions is not None:
                # Matryoshka: keep the leading dimensions, then re-normalise.
                vectors = [F.normalize(v[..., : req.dimensions], dim=-1) for v in vectors]
            results[kind] = Embedded(vectors, sum(len(p.input_ids) for p in items))
        await self._reduce(req, results)
        return results

    async def _reduce(self, req: EmbedRequest, results: dict[str, Embedded]) -> None:
        """Pool the passages (`pool_factor`), then encode FDEs (`fde`) of what is returned:
        the pooled vectors when pooling was asked, the full multi-vectors otherwise."""
        if req.pool_factor > 1 and "passage" in results:
            embedded = results["passage"]
            embedded.vectors = await self._pool_passages(embedded.vectors, req.pool_factor)
        if req.fde is not None:
            device, params = self.backend.device, req.fde
            for kind, embedded in results.items():
                vectors, document = embedded.vectors, kind == "passage"
                embedded.fde = await self._on_device(
                    lambda v=vectors, d=document: fde.encode(v, params, document=d, device=device)
                )

    async def _pool_passages(
        self, vectors: list[torch.Tensor], pool_factor: int
    ) -> list[torch.Tensor]:
        """Token pooling of each passage (see pooling.py). The distances are one GEMM: on the
        engine thread when the model is on a GPU (milliseconds there), in the prepare pool on
        a CPU deployment (where the engine thread would only do the same CPU work while
        holding up the next batch). Ward's merges always run in the prepare pool. At most
        PREPARE_THREADS + 1 distance matrices (n^2 float64 each) are held per request."""
        device = self.backend.device
        distances_on = self._in_pool if device.type == "cpu" else self._on_device
        out = list(vectors)
        room = asyncio.Semaphore(self.settings.prepare_threads + 1)

        async def one(i: int, v: torch.Tensor) -> None:
            if pooling.clusters(v.shape[0], pool_factor) >= v.shape[0]:
                return
            async with room:
                d = await distances_on(lambda: pooling.row_distances(v, device))
                out[i] = await self._in_pool(lambda: pooling.pool_with_distances(v, d, pool_factor))

        await asyncio.gather(*(one(i, v) for i, v in enumerate(vectors)))
        return out

    def _check_response_size(
        self, req: EmbedRequest, prepared: dict[Kind, list[Prepared]]
    ) -> None:
        """Refuse, before any model work, a response bigger than MAX_RESPONSE_BYTES: its size
        follows from the token counts (multi-vector), the width and the encoding, and the
        whole of it would be built in host memory."""
        width = req.dimensions or self.caps.dimension
        values = 0
        if req.return_embeddings:
            for kind, items in prepared.items():
                if not self.caps.multi_vector:
                    rows = len(items)
                elif kind == "passage":  # pooled passages keep n // pool_factor vectors
                    rows = sum(pooling.clusters(len(p.input_ids), req.pool_factor) for p in items)
                else:
                    rows = sum(len(p.input_ids) for p in items)
                values += rows * width
        if req.fde is not None:
            values += req.fde.dimensions() * sum(len(items) for items in prepared.values())
        size = response_bytes(values, req.encoding_format, req.embedding_type)
        if req.compute_scores:
            size += 16 * len(req.queries) * len(req.passages)
        limit = self.settings.max_response_bytes
        if size <= limit:
            return
        hints = []
        if req.return_embeddings and req.encoding_format == "float":
            hints.append("`encoding_format: base64`")
        if req.return_embeddings and req.embedding_type == "float":
            hints.append("`embedding_type: binary`")
        if req.compute_scores and req.return_embeddings:
            hints.append("`return_embeddings: false`")
        hints.append("fewer inputs per request")
        raise RequestError(
            f"the response would be about {size} bytes, the limit is {limit} "
            f"(MAX_RESPONSE_BYTES); send {', or '.join(hints)}",
            status=413,
            code="response_too_large",
        )

    def _label(self, field: str, index: int) -> str:
        return field if field == "query" else f"{field}[{index}]"

    def _image_reservation(self, sources: list[ImageSource]) -> int:
        """Worst-case bytes of one request's images: the tiles of every image (kept until the
        response) plus the encoded images of the `IMAGE_FETCH_CONCURRENCY` biggest sources in
        flight at once (a URL may be up to IMAGE_MAX_BYTES; base64 is its decoded size). The
        decoded bitmaps are bounded separately, by IMAGE_DECODE_BUDGET_PIXELS."""
        limits = self.settings.images
        encoded = sorted(
            (
                limits.max_bytes
                if s.url is not None and s.url[:5].lower() != "data:"
                else min(limits.max_bytes, len(s.content or s.url or "") * 3 // 4)
                for s in sources
            ),
            reverse=True,
        )
        tiles = len(sources) * self.backend.max_image_tile_bytes()
        return tiles + sum(encoded[: limits.max_concurrency])

    async def _reserve_image_memory(
        self, items: list[Item], field: str, disconnected: Disconnected | None
    ) -> int:
        sources = [item.image for item in items if item.image is not None]
        if not sources:
            return 0
        need = self._image_reservation(sources)
        budget = self._image_memory
        if need > budget.total:
            raise RequestError(
                f"{field}: {len(sources)} images need up to {need} bytes of image memory (tiles "
                f"kept until the response, downloads in flight), the limit is "
                f"IMAGE_MEMORY_BUDGET_BYTES={budget.total}; send fewer images per request",
                status=413,
            )
        # Waits (first come, first served) while other requests hold the budget; a client that
        # hangs up meanwhile leaves the line.
        acquire = asyncio.ensure_future(budget.acquire(need))
        try:
            while True:
                done, _ = await asyncio.wait({acquire}, timeout=0.25)
                if done:
                    acquire.result()
                    return need
                if disconnected is not None and await disconnected():
                    raise RequestError("the client disconnected", status=499)
        except BaseException:
            if not acquire.done():
                acquire.cancel()  # Budget.acquire hands back a grant that raced the cancel
            elif not acquire.cancelled() and acquire.exception() is None:
                budget.release(need)
            raise

    async def _load_images(self, items: list[Item], field: str) -> None:
        """Fetch, decode and tile each image (one at a time per slot, in the prepare pool):
        only the tiles are kept, the bitmap is dropped as soon as it is tiled."""
        indices = [i for i, item in enumerate(items) if item.image is not None]
        if not indices:
            return
        try:
            tiles = await process_images(
                [items[i].image for i in indices],
                self.settings.images,
                self.backend.tile_image,
                pixels=self._image_pixels,
                executor=self._pool,
            )
        except ImageInputError as e:
            raise RequestError(f"{self._label(field, indices[e.index])}: {e.reason}") from None
        for i, pixels in zip(indices, tiles, strict=True):
            items[i].pixel_values = pixels

    def _prepare(self, req: EmbedRequest, labels: dict[str, str]) -> dict[Kind, list[Prepared]]:
        """Token ids (and image tiles) of every input, truncated as the request says."""
        prepared: dict[Kind, list[Prepared]] = {}
        for kind, items in (("query", req.queries), ("passage", req.passages)):
            if not items:
                continue
            limit = self.settings.max_tokens[kind]
            setting = self.settings.max_tokens_setting[kind]
            raw = self.backend.prepare(items, kind, req.instruction)
            prepared[kind] = [
                truncate_prepared(p, limit, req.truncate, self._label(labels[kind], i), setting)
                for i, p in enumerate(raw)
            ]
        return prepared

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _on_device(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.engine.call(fn))

    def _scores(self, queries: list[torch.Tensor], passages: list[torch.Tensor]) -> torch.Tensor:
        """Runs on the engine's thread: the vectors go back to the device for scoring (passage
        chunk by passage chunk for multi-vectors)."""
        device = self.backend.device
        if self.caps.multi_vector:
            return scoring.maxsim_scores(queries, passages, device=device).cpu()
        return scoring.cosine_scores(
            torch.stack(queries).to(device), torch.stack(passages).to(device)
        ).cpu()


def _vectors(arg: Embedded | dict[str, Embedded]) -> list[torch.Tensor]:
    embedded = [arg] if isinstance(arg, Embedded) else list(arg.values())
    return [v for e in embedded for v in (*e.vectors, *([e.fde] if e.fde is not None else []))]
