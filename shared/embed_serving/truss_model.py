"""The Truss `Model` contract, once for all packages: each `model.py` only says which backend
and which token-limit settings it uses.

This is the route layer. Both routes take the starlette `Request` alone (deliberately without
`from __future__ import annotations`: Truss inspects the annotation to decide that), so Truss
hands us the raw body instead of parsing it itself, and the pipeline can see a client that
hangs up.
"""

import logging
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Response
from starlette.requests import Request

from embed_serving import metrics
from embed_serving.body import parse_json
from embed_serving.checkpoint import resolve_checkpoint_dir
from embed_serving.errors import RequestError, Route, error_response
from embed_serving.service import EmbeddingService

log = logging.getLogger(__name__)


class TrussModel:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service: EmbeddingService | None = None

    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        raise NotImplementedError

    def load(self) -> None:
        if self._lazy_data_resolver is not None:
            # Truss's model_cache downloads in the background; wait for the files.
            self._lazy_data_resolver.block_until_download_complete()
        self._service = self.create_service(resolve_checkpoint_dir(self._config, self._secrets))

    def _ready(self) -> EmbeddingService:
        if self._service is None:
            raise HTTPException(status_code=503, detail="the model is still loading")
        return self._service

    async def predict(self, request: Request) -> Response:
        return await self._handle("predict", request)

    async def embeddings(self, request: Request) -> Response:
        return await self._handle("embeddings", request)

    async def _handle(self, route: Route, request: Request) -> Response:
        service = self._ready()
        try:
            body = parse_json(await request.body())
            if route == "predict":
                response = await service.predict(body, request.is_disconnected)
            else:
                response = await service.embeddings(body, request.is_disconnected)
        except RequestError as e:
            # A client's mistake is one line, not a traceback: bad clients must not flood the
            # deployment's logs. The message is the one the client got, ascii-escaped.
            log.warning(
                "%s %d %s (request id %s)", route, e.status, ascii(e.message)[1:-1][:500],
                request.headers.get("x-baseten-request-id", "-"),
            )  # fmt: skip
            response = error_response(e, route)
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response
