"""The Truss `Model` contract, once for all packages: each `model.py` only says which backend
and which token-limit settings it uses.

This is the route layer. Both routes take the starlette `Request` alone (deliberately without
`from __future__ import annotations`: Truss inspects the annotation to decide that), so Truss
hands us the raw body instead of parsing it itself (its parser answers invalid UTF-8, deep
nesting or gzip with a 500), we can cap the body before it is all in memory, and the pipeline
can see a client that hangs up.
"""

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import Response
from starlette.background import BackgroundTask
from starlette.requests import Request

from embed_serving import memory, metrics, threads
from embed_serving.body import parse_json, read_body
from embed_serving.checkpoint import resolve_checkpoint_dir
from embed_serving.errors import RequestError, Route, error_response, printable
from embed_serving.service import EmbeddingService
from embed_serving.settings import check_env

log = logging.getLogger(__name__)


class TrussModel:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service: EmbeddingService | None = None
        self._inflight_bytes = 0  # request bodies held by requests in progress

    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        raise NotImplementedError

    def load(self) -> None:
        check_env()  # a malformed setting fails here, before any weight is read
        threads.apply(self._config)  # before torch runs anything (see threads.py)
        memory.configure_allocator()
        if self._lazy_data_resolver is not None:
            # Truss's model_cache downloads in the background; wait for the files.
            self._lazy_data_resolver.block_until_download_complete()
        self._service = self.create_service(resolve_checkpoint_dir(self._config, self._secrets))

    async def predict(self, request: Request) -> Response:
        return await self._handle("predict", request)

    async def embeddings(self, request: Request) -> Response:
        return await self._handle("embeddings", request)

    async def _handle(self, route: Route, request: Request) -> Response:
        held = 0
        try:
            service = self._service
            if service is None:
                raise RequestError("the model is still loading", status=503)
            settings = service.settings
            held = self._reserve(request, settings.max_request_bytes, settings.max_inflight_bytes)
            raw = await read_body(request.headers, request.stream(), settings.max_request_bytes)
            body = parse_json(raw)
            big = len(raw) > memory.TRIM_AFTER_BYTES
            del raw
            if route == "predict":
                response = await service.predict(body, request.is_disconnected)
            else:
                response = await service.embeddings(body, request.is_disconnected)
            del body
            if big:
                # The body and all that was parsed from it are freed now: give it back.
                await asyncio.to_thread(memory.release_memory)
            if len(response.body) > memory.TRIM_AFTER_BYTES:
                # After a big response is sent and its buffer freed.
                response.background = BackgroundTask(asyncio.to_thread, memory.release_memory)
        except RequestError as e:
            # A client's mistake is one line, not a traceback: bad clients must not flood the
            # deployment's logs. The message is the one the client got, escaped.
            log.warning(
                "%s %d %s (request id %s)", route, e.status, printable(e.message)[:500],
                printable(request.headers.get("x-baseten-request-id", "-")[:100]),
            )  # fmt: skip
            response = error_response(e, route)
        finally:
            self._inflight_bytes -= held
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    def _reserve(self, request: Request, max_request: int, max_inflight: int) -> int:
        """Hold room for this request's body in the server-wide budget (MAX_INFLIGHT_BYTES):
        the body and what is parsed from it live until the response is built, so concurrent
        big bodies are bounded together, not only one by one. Without a Content-Length the
        request is charged the whole per-request cap."""
        declared = request.headers.get("content-length", "").strip()
        size = min(int(declared), max_request) if declared.isdigit() else max_request
        if self._inflight_bytes and self._inflight_bytes + size > max_inflight:
            raise RequestError(
                f"the server is busy: {self._inflight_bytes} bytes of request bodies are in "
                f"progress and this one adds {size}, the limit is {max_inflight} "
                "(MAX_INFLIGHT_BYTES); retry after 1 s",
                status=429,
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self._inflight_bytes += size
        return size
