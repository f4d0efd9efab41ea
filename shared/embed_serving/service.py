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

from embed_serving import scoring
from embed_serving.backend import Backend, Prepared, truncate_prepared
from embed_serving.encoding import encode_vector, json_response, to_numpy
from embed_serving.engine import ClientGone, Engine, EngineLimits
from embed_serving.errors import RequestError
from embed_serving.images import ImageInputError, load_images
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
    vectors: list[torch.Tensor]  # per input, input order, CPU float32
    tokens: int


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
                vectors = [to_numpy(v) for v in results[kind].vectors]
                payload[key] = [encode_vector(v, req.encoding_format) for v in vectors]
                if self.caps.multi_vector and req.encoding_format == "base64":
                    payload[key.replace("embeddings", "embedding_shapes")] = [
                        list(v.shape) for v in vectors
                    ]
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
        for i, vector in enumerate(embedded.vectors):
            array = to_numpy(vector)
            entry: dict[str, Any] = {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(array, req.encoding_format),
            }
            if self.caps.multi_vector:
                entry["shape"] = list(array.shape)
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
        self.engine.check_room(len(req.queries) + len(req.passages))
        await self._load_images(req.passages, labels["passage"])
        chars = sum(len(item.text or "") for item in req.queries + req.passages)
        if chars <= INLINE_TEXT_CHARS and not any(i.image_data for i in req.passages):
            prepared = self._prepare(req, labels)
        else:
            prepared = await self._in_pool(lambda: self._prepare(req, labels))
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
        return results

    def _label(self, field: str, index: int) -> str:
        return field if field == "query" else f"{field}[{index}]"

    async def _load_images(self, items: list[Item], field: str) -> None:
        indices = [i for i, item in enumerate(items) if item.image is not None]
        if not indices:
            return
        try:
            images = await load_images([items[i].image for i in indices], self.settings.images)
        except ImageInputError as e:
            raise RequestError(f"{self._label(field, indices[e.index])}: {e.reason}") from None
        for i, image in zip(indices, images, strict=True):
            items[i].image_data = image

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
    if isinstance(arg, Embedded):
        return arg.vectors
    return [v for e in arg.values() for v in e.vectors]
