"""Truss entry point for llama-nemoretriever-colembed-3b-v1: wires the shared library to one
model."""

from __future__ import annotations

from pathlib import Path

from embed_serving.models.colembed_backend import ColEmbedBackend
from embed_serving.service import EmbeddingService
from embed_serving.settings import Settings
from embed_serving.truss_model import TrussModel


class Model(TrussModel):
    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        backend = ColEmbedBackend(checkpoint_dir)
        limits = {
            "query": ("MAX_QUERY_TOKENS", backend.spec.query_max_tokens),
            "passage": ("MAX_PASSAGE_TOKENS", backend.spec.passage_max_tokens),
        }
        # Page images are long: a bigger padded-token budget per forward pass.
        settings = Settings.from_env(limits, backend.max_positions, batch_max_tokens=65536)
        return EmbeddingService(backend, settings)
