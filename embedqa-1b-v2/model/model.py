"""Truss entry point for llama-3.2-nv-embedqa-1b-v2: wires the shared library to one model."""

from __future__ import annotations

from typing import Any

from embed_serving.checkpoint import resolve_checkpoint_dir
from embed_serving.models.embedqa import EmbedQABackend
from embed_serving.service import EmbeddingService
from embed_serving.settings import Settings
from fastapi import Response


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._data_dir = kwargs.get("data_dir")
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service: EmbeddingService | None = None

    def load(self) -> None:
        if self._lazy_data_resolver is not None:
            self._lazy_data_resolver.block_until_download_complete()
        checkpoint = resolve_checkpoint_dir(self._config, self._secrets)
        backend = EmbedQABackend(checkpoint)
        settings = Settings.from_env(
            {kind: ("MAX_INPUT_TOKENS", 8192) for kind in ("query", "passage")},
            model_max_tokens=backend.max_positions,
        )
        self._service = EmbeddingService(backend, settings)

    async def predict(self, model_input: Any) -> Response:
        return await self._service.predict(model_input)

    async def embeddings(self, model_input: Any) -> Response:
        return await self._service.embeddings(model_input)
