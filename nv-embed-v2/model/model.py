"""Truss entry point for NV-Embed-v2: wires the shared library to one model."""

from __future__ import annotations

from typing import Any

from embed_serving.checkpoint import resolve_checkpoint_dir
from embed_serving.models.nvembed_backend import NVEmbedBackend
from embed_serving.service import EmbeddingService
from embed_serving.settings import Settings
from fastapi import Response


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service: EmbeddingService | None = None

    def load(self) -> None:
        if self._lazy_data_resolver is not None:
            self._lazy_data_resolver.block_until_download_complete()
        backend = NVEmbedBackend(resolve_checkpoint_dir(self._config, self._secrets))
        settings = Settings.from_env(
            {kind: ("MAX_INPUT_TOKENS", 32768) for kind in ("query", "passage")},
            model_max_tokens=backend.max_positions,
        )
        self._service = EmbeddingService(backend, settings)

    async def predict(self, model_input: Any) -> Response:
        return await self._service.predict(model_input)

    async def embeddings(self, model_input: Any) -> Response:
        return await self._service.embeddings(model_input)
