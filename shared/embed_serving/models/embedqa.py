"""llama-3.2-nv-embedqa-1b-v2 / llama-nemotron-embed-1b-v2: bidirectional Llama-3.2-1B, masked mean
pooling over every real token (BOS included), L2 normalisation, `query: ` / `passage: `
prefixes, Matryoshka dimensions."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from embed_serving.backend import Backend, Prepared
from embed_serving.checkpoint import (
    load_strict,
    load_tokenizer,
    pick_attn_implementation,
    pick_device,
    pick_dtype,
    read_config,
)
from embed_serving.models.llama import BidirectionalLlama, llama_config, mean_pool
from embed_serving.request import Item, Kind, ModelCaps

PREFIXES = {"query": "query: ", "passage": "passage: "}
MATRYOSHKA_DIMS = (384, 512, 768, 1024, 2048)


class EmbedQABackend(Backend):
    def __init__(self, checkpoint_dir: Path) -> None:
        self.device = pick_device()
        # The model card runs it in bf16 on GPU.
        self.dtype = pick_dtype(self.device, torch.bfloat16)
        raw = read_config(checkpoint_dir)
        config = llama_config(raw, pick_attn_implementation(self.device))
        with torch.device("meta"):
            self.model = BidirectionalLlama(config)
        load_strict(self.model, checkpoint_dir, self.device, self.dtype)
        self.model.reset_rotary(self.device)
        self.model.eval()
        self.tokenizer = load_tokenizer(checkpoint_dir, padding_side="right")
        self.max_positions = int(config.max_position_embeddings)
        hidden = int(config.hidden_size)
        # Matryoshka sizes the checkpoint can give: the published ones up to its width, plus
        # its full width (a tiny test checkpoint is narrower than 384).
        dims = tuple(d for d in MATRYOSHKA_DIMS if d < hidden) + (hidden,)
        self.caps = ModelCaps(
            name="nvidia/llama-3.2-nv-embedqa-1b-v2",
            model_ids=(
                "nvidia/llama-3.2-nv-embedqa-1b-v2",
                "nvidia/llama-nemotron-embed-1b-v2",
                "llama-3.2-nv-embedqa-1b-v2",
                "llama-nemotron-embed-1b-v2",
            ),
            dimensions=dims,
            dimension=hidden,
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else raw.get("eos_token_id", 0) or 0)
        self._protected = {
            kind: len(self.tokenizer(prefix.rstrip())["input_ids"])
            for kind, prefix in PREFIXES.items()
        }

    def prepare(self, items: list[Item], kind: Kind, instruction: str | None) -> list[Prepared]:
        texts = [PREFIXES[kind] + (item.text or "") for item in items]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [Prepared(list(ids), protected=self._protected[kind]) for ids in encoded]

    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        ids, mask = self.pad(batch, self.pad_id)
        hidden = self.model(input_ids=ids, attention_mask=mask)
        pooled = F.normalize(mean_pool(hidden, mask), dim=-1)
        return list(pooled)
