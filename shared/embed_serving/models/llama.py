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

from embed_serving.models import attention as attn_paths

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
        # The implementation the padded paths use (sdpa, or flash_attention_2 where it imports).
        self._padded_implementation = config._attn_implementation
        # The deployment's ATTENTION setting (default sdpa); a bad value fails here, at load.
        self.attention = "sdpa"
        self.set_attention(attn_paths.pick_attention())

    def set_attention(self, path: str) -> None:
        """Choose how a batch is attended (see models/attention.py): `sdpa`, `sdpa_masked` or
        `varlen`. Every path gives the same outputs up to float rounding."""
        if path not in attn_paths.ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {path!r}")
        if path == "varlen":
            attn_paths.register()
        self.attention = path
        # The layers share this config object and read the implementation at every call.
        self.config._attn_implementation = (
            attn_paths.VARLEN_IMPLEMENTATION if path == "varlen" else self._padded_implementation
        )

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
        # Packing needs a (B, T) padding mask; a custom 4D mask is used as given (padded path).
        two_d = attention_mask is None or attention_mask.ndim == 2
        if self.attention == "varlen" and attention_mask is not None and two_d:
            return self._forward_packed(inputs_embeds, attention_mask)
        position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0)
        if self.attention == "sdpa_masked" and self._padded_implementation == "sdpa" and two_d:
            # The reference: the padded mask, never skipped for unpadded batches.
            if attention_mask is None:
                attention_mask = torch.ones((batch, length), device=inputs_embeds.device)
            mask = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
        elif attention_mask is not None and bool(attention_mask.bool().all()):
            # No row is padded: no mask at all (exact), so sdpa may pick its fastest kernel.
            mask = None
        else:
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

    def _forward_packed(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The padding-free path: only real tokens run through the stack, as one packed row
        whose sequence boundaries the attention kernel respects. Returned re-padded (B, T, H),
        zeros at padded positions, so pooling code is the same for every path."""
        keep, positions, cu_seqlens, max_seqlen = attn_paths.pack(attention_mask)
        hidden = inputs_embeds[keep].unsqueeze(0)  # (1, N, H)
        position_ids = positions.unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
            )
        out = hidden.new_zeros((*attention_mask.shape, hidden.shape[-1]))
        out[keep] = self.norm(hidden[0])
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions where `mask` is 1, computed in fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1.0)
