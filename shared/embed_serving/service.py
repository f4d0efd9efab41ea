"""The request pipeline shared by the three packages: validate, fetch images, tokenise, truncate,
batch, embed, score, encode. `model.py` files only pick a backend and call `predict` /
`embeddings`."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import HTTPException, Response

from embed_serving import scoring
from embed_serving.backend import Backend, Prepared, truncate_prepared
from embed_serving.batching import padding_fraction, plan_batches
from embed_serving.encoding import encode_vector, json_response, to_numpy
from embed_serving.errors import RequestError
from embed_serving.images import ImageInputError, load_images
from embed_serving.request import EmbedRequest, Item, Kind, parse_embeddings, parse_predict
from embed_serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    vectors: list[torch.Tensor]  # per input, input order, on the model's device
    tokens: int


class EmbeddingService:
    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self.caps = backend.caps
        # One forward pass at a time: the GPU is the shared resource, and interleaving two
        # requests' batches only adds memory pressure.
        self._gpu_lock = threading.Lock()

    # ---- routes -------------------------------------------------------------------------

    async def predict(self, body: Any) -> Response:
        req = parse_predict(body, self.caps, self.settings)
        labels = {
            "query": "query" if "query" in body else "queries",
            "passage": "documents" if "documents" in body else "passages",
        }
        results = await self._embed_request(req, labels)
        payload: dict[str, Any] = {"model": self.caps.name}
        for kind, key in (("query", "query_embeddings"), ("passage", "passage_embeddings")):
            if kind in results and req.return_embeddings:
                vectors = [to_numpy(v) for v in results[kind].vectors]
                payload[key] = [encode_vector(v, req.encoding_format) for v in vectors]
                if self.caps.multi_vector and req.encoding_format == "base64":
                    payload[key.replace("embeddings", "embedding_shapes")] = [
                        list(v.shape) for v in vectors
                    ]
        if req.compute_scores:
            scores = self._scores(results["query"].vectors, results["passage"].vectors)
            payload["scores"] = to_numpy(scores)
            if req.top_k is not None:
                payload["top_k"] = scoring.top_k_indices(scores, req.top_k)
        tokens = sum(r.tokens for r in results.values())
        payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response(payload)

    async def embeddings(self, body: Any) -> Response:
        req = parse_embeddings(body, self.caps, self.settings)
        results = await self._embed_request(req, {"query": "input", "passage": "input"})
        (embedded,) = results.values()
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
        model = body.get("model") or self.caps.name
        usage = {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}
        return json_response({"object": "list", "data": data, "model": model, "usage": usage})

    # ---- pipeline -----------------------------------------------------------------------

    async def _embed_request(
        self, req: EmbedRequest, labels: dict[str, str]
    ) -> dict[str, Embedded]:
        await self._load_images(req.passages, labels["passage"])
        work: dict[str, list[Prepared]] = {}
        for kind, items in (("query", req.queries), ("passage", req.passages)):
            if items:
                work[kind] = self._prepare(items, kind, req, labels[kind])
        max_items = min(
            req.batch_size or self.settings.batch_max_items, self.settings.batch_max_items
        )
        return await asyncio.to_thread(self._run, work, max_items, req.dimensions)

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

    def _prepare(
        self, items: list[Item], kind: Kind, req: EmbedRequest, field: str
    ) -> list[Prepared]:
        prepared = self.backend.prepare(items, kind, req.instruction)
        limit = self.settings.max_tokens[kind]
        setting = self.settings.max_tokens_setting[kind]
        return [
            truncate_prepared(p, limit, req.truncate, self._label(field, i), setting)
            for i, p in enumerate(prepared)
        ]

    def _run(
        self, work: dict[str, list[Prepared]], max_items: int, dimensions: int | None
    ) -> dict[str, Embedded]:
        results: dict[str, Embedded] = {}
        with self._gpu_lock, torch.inference_mode():
            for kind, prepared in work.items():
                lengths = [len(p.input_ids) for p in prepared]
                batches = plan_batches(lengths, max_items, self.settings.batch_max_tokens)
                if log.isEnabledFor(logging.DEBUG):  # not worth computing on every request
                    waste = 100 * padding_fraction(lengths, batches)
                    log.debug("%s: %d inputs, padding %.1f%%", kind, len(prepared), waste)
                vectors: list[torch.Tensor | None] = [None] * len(prepared)
                for batch in batches:
                    try:
                        outputs = self.backend.forward([prepared[i] for i in batch])
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        raise HTTPException(
                            status_code=413,
                            detail="the inputs do not fit in GPU memory; send fewer or shorter "
                            "inputs, or lower BATCH_MAX_TOKENS",
                        ) from None
                    for i, out in zip(batch, outputs, strict=True):
                        vectors[i] = out
                done = [v for v in vectors if v is not None]
                assert len(done) == len(prepared), "every input gets exactly one output"
                if dimensions is not None:
                    # Matryoshka: keep the leading dimensions, then re-normalise.
                    done = [F.normalize(v[..., :dimensions], dim=-1) for v in done]
                results[kind] = Embedded(done, sum(lengths))
        return results

    def _scores(self, queries: list[torch.Tensor], passages: list[torch.Tensor]) -> torch.Tensor:
        if self.caps.multi_vector:
            return scoring.maxsim_scores(queries, passages)
        return scoring.cosine_scores(torch.stack(queries), torch.stack(passages))
