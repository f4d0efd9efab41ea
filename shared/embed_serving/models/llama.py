"""Bidirectional Llama-family encoder built from transformers' own Llama layers.

All three NVIDIA models use a Llama-architecture decoder stack (NV-Embed-v2's Mistral-7B is the
same computation: no biases, RMSNorm, SwiGLU, RoPE, GQA) turned into an encoder: no causal mask,
padding masked. We reuse transformers' `LlamaDecoderLayer` (so sdpa / flash-attention kernels and
RoPE variants such as llama3 scaling come from the library) and own only the forward pass, which
builds a bidirectional mask and marks every attention module non-causal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

# Keys of NVIDIA's remote-code configs that mean nothing to LlamaConfig (or would make
# transformers try to resolve remote code).
_DROP_KEYS = {"auto_map", "model_type", "architectures", "transformers_version", "_name_or_path"}


def llama_config(raw: dict[str, Any], attn_implementation: str) -> LlamaConfig:
    """A LlamaConfig from an official config.json (llama_bidirec, bidir_mistral, ...)."""
    kwargs = {k: v for k, v in raw.items() if k not in _DROP_KEYS}
    # The official models attend over the whole sequence: Mistral's sliding window never applies.
    kwargs.pop("sliding_window", None)
    kwargs["use_cache"] = False
    config = LlamaConfig(**kwargs)
    config._attn_implementation = attn_implementation
    return config


class BidirectionalLlama(nn.Module):
    """`embed_tokens`, `layers.N.*`, `norm`: the official parameter names, no LM head."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        for layer in self.layers:
            # sdpa/flash kernels read this flag; False = every token sees every real token.
            layer.self_attn.is_causal = False
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def reset_rotary(self, device: torch.device) -> None:
        """Recompute RoPE frequencies on `device` (they are not in the checkpoint, so a model
        built on the meta device has none)."""
        with torch.device(device):
            self.rotary_emb = LlamaRotaryEmbedding(self.config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, H). Inputs are right-padded, so positions are 0..T-1."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        return self.norm(hidden)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions where `mask` is 1, computed in fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1.0)
