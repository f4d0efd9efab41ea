"""The Truss `Model` contract, once for all packages: each `model.py` only says which backend
and which token-limit settings it uses.

This is the route layer. Both routes take the starlette `Request` alone (deliberately without
`from __future__ import annotations`: Truss inspects the annotation to decide that), so Truss
hands us the raw body instead of parsing it itself (its parser answers invalid UTF-8, deep
nesting or gzip with a 500), and the pipeline can see a client that hangs up. Truss still reads
the whole body before calling us; `http_guard`, installed from `load()`, caps and times it
before that.
"""

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import Response
from starlette.background import BackgroundTask
from starlette.requests import Request

from embed_serving import http_guard, memory, metrics, startup, threads
from embed_serving.body import parse_json, read_body
from embed_serving.checkpoint import resolve_checkpoint_dir
from embed_serving.device import resolve_device
from embed_serving.errors import RequestError, Route, error_response
from embed_serving.service import EmbeddingService
from embed_serving.settings import check_env

log = logging.getLogger(__name__)


class TrussModel:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service: EmbeddingService | None = None
        # Bodies held by requests in progress, counted here only where no guard reads them
        # first (`http_guard`, which holds them from before the first byte is read).
        self._guard: http_guard.BodyGuard | None = None
        self._budget: http_guard.InflightBudget | None = None

    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        raise NotImplementedError

    def load(self) -> None:
        """Load, or end the process with the reason (startup.fail): a deployment that cannot
        serve must not stay up, never ready."""
        # Marks where the load itself begins (after Truss imported the model code and torch).
        log.info("load started: %s", self._config.get("model_name", "?"))
        try:
            self._load()
        except Exception as error:
            startup.fail(error)

    def _load(self) -> None:
        explicit = {name for name, value in os.environ.items() if value.strip()}
        settings = check_env()  # a malformed setting fails here, before any weight is read
        # The GPU the config asks for, or a refusal to start (never a silent CPU run). The
        # backends read DEVICE: they get the device that was checked.
        device = resolve_device(self._config)
        os.environ["DEVICE"] = str(device)
        threads.apply(self._config)  # before torch runs anything (see threads.py)
        memory.configure_allocator()
        self._guard = http_guard.install(
            settings.max_request_bytes,
            settings.max_inflight_bytes,
            settings.body_timeout_s,
            settings.idle_timeout_s,
        )
        if self._lazy_data_resolver is not None:
            # Truss's model_cache downloads in the background; wait for the files.
            self._lazy_data_resolver.block_until_download_complete()
        checkpoint = resolve_checkpoint_dir(self._config, self._secrets)
        self._service = self.create_service(checkpoint)
        backend = self._service.backend
        report = startup.load_report(
            self._config,
            checkpoint,
            getattr(backend, "model", None),
            backend.device,
            backend.dtype,
            explicit,
        )
        log.info(report)

    def is_healthy(self) -> bool:
        """Truss's health check (its readiness route, `GET /v1/models/model`, answers 503 while
        this is false; Baseten restarts a replica that keeps failing it). Called only after
        `load()` has finished. False once the engine has stopped: its worker thread ended, or
        the device failed ENGINE_MAX_CONSECUTIVE_FAILURES passes in a row."""
        return self._service is not None and self._service.healthy()

    async def predict(self, request: Request) -> Response:
        return await self._handle("predict", request)

    async def embeddings(self, request: Request) -> Response:
        return await self._handle("embeddings", request)

    async def _handle(self, route: Route, request: Request) -> Response:
        held = 0
        big = False
        try:
            service = self._service
            if service is None:
                raise RequestError("the model is still loading", status=503)
            settings = service.settings
            if self._guard is None:
                held = self._reserve(
                    request, settings.max_request_bytes, settings.max_inflight_bytes
                )
            raw = await read_body(request.headers, request.stream(), settings.max_request_bytes)
            big = len(raw) > memory.TRIM_AFTER_BYTES
            body = parse_json(raw)
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
            http_guard.log_refusal(route, e, request.headers.get("x-baseten-request-id", "-"))
            response = error_response(e, route)
            if big:
                # A refused big body (invalid JSON, a 400 on an item, a 413 on the response)
                # is as much memory as an accepted one: give it back too.
                response.background = BackgroundTask(asyncio.to_thread, memory.release_memory)
            return response
        finally:
            if self._budget is not None:
                self._budget.release(held)
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    def _reserve(self, request: Request, max_request: int, max_inflight: int) -> int:
        """Hold room for this request's body in the server-wide budget (MAX_INFLIGHT_BYTES),
        where no guard did it before the body was read (see `http_guard.InflightBudget`)."""
        if self._budget is None:
            self._budget = http_guard.InflightBudget(max_inflight)
        declared = request.headers.get("content-length", "").strip()
        size = min(int(declared), max_request) if declared.isdigit() else max_request
        return self._budget.reserve(size)
