"""Truss entry point for NV-Embed-v2: wires the shared library to one model."""

from __future__ import annotations

from pathlib import Path

from embed_serving.models.nvembed_backend import NVEmbedBackend
from embed_serving.service import EmbeddingService
from embed_serving.settings import Settings
from embed_serving.truss_model import TrussModel


class Model(TrussModel):
    def create_service(self, checkpoint_dir: Path) -> EmbeddingService:
        backend = NVEmbedBackend(checkpoint_dir)
        limits = {kind: ("MAX_INPUT_TOKENS", 32768) for kind in ("query", "passage")}
        return EmbeddingService(backend, Settings.from_env(limits, backend.max_positions))
