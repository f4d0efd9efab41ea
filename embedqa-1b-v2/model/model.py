"""Truss entry point for llama-3.2-nv-embedqa-1b-v2: wires the shared library to one model."""

from __future__ import annotations

from pathlib import Path

from embed_serving.models.embedqa import EmbedQABackend
from embed_serving.service import EmbeddingService
from embed_serving.settings import Settings
from embed_serving.truss_model import TrussModel


class Model(TrussModel):
    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        backend = EmbedQABackend(checkpoint_dir)
        limits = {kind: ("MAX_INPUT_TOKENS", 8192) for kind in ("query", "passage")}
        return EmbeddingService(backend, Settings.from_env(limits, backend.max_positions))
