"""The three models at their official shapes, with random weights built on the device.

No checkpoint files are read or written: each config below is the architecture part of the
model's published `config.json` (hard-coded here so the benchmark needs nothing but this
repository), the network is built on the meta device, cast, and materialised directly on the
target device with random weights. Only shapes matter for speed and memory, so the outputs are
meaningless.

`smoke` shrinks every model to a few layers and a small width (same code path, same
architecture) so that the benchmark runs on a CPU in seconds; the test suite does that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embed_serving.backend import Backend
from embed_serving.checkpoint import pick_attn_implementation
from embed_serving.models.colembed import ColEmbed, ColEmbedSpec
from embed_serving.models.colembed_backend import ColEmbedBackend
from embed_serving.models.embedqa import EmbedQABackend
from embed_serving.models.llama import BidirectionalLlama, llama_config
from embed_serving.models.nvembed import NVEmbed
from embed_serving.models.nvembed_backend import NVEmbedBackend

# ---- official shapes (architecture keys of each published config.json) -----------------------

LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# nvidia/llama-nemotron-embed-1b-v2: Llama-3.2-1B made bidirectional.
EMBEDQA_1B_V2: dict[str, Any] = {
    "model_type": "llama_bidirec",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA3_ROPE,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# nvidia/NV-Embed-v2: Mistral-7B-v0.1 (text_config) + latent attention (the official defaults,
# which the published config leaves implicit: 512 latents, 8 heads of 4096).
NV_EMBED_V2: dict[str, Any] = {
    "model_type": "nvembed",
    "padding_side": "right",
    "is_mask_instruction": True,
    "text_config": {
        "model_type": "bidir_mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "latent_attention_config": {
        "num_latents_value": 512,
        "num_cross_heads": 8,
        "hidden_dim": 4096,
        "latent_dim": 4096,
        "cross_dim_head": 4096,
    },
}

# nvidia/llama-nemoretriever-colembed-3b-v1: SigLIP2 giant (patch 16) at 512-px tiles, pixel
# shuffle 0.5 (256 tokens a tile), up to 6 tiles + thumbnail, Llama-3.2-3B bidirectional.
# INFERRED like the model code (v1's config could not be read here): the tower's and the
# backbone's published shapes, the tile size and tile cap of NVIDIA's retriever configs.
COLEMBED_3B_V1: dict[str, Any] = {
    "model_type": "llama_nemoretrievercolembed",
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 512,
    "max_input_tiles": 6,
    "min_dynamic_patch": 1,
    "norm_type": "siglip",
    "ps_version": "v2",
    "select_layer": -1,
    "template": "bidirectional-llama-retriever",
    "use_thumbnail": True,
    "q_max_length": 512,
    "p_max_length": 10240,
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "num_hidden_layers": 40,
        "num_attention_heads": 16,
        "image_size": 512,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    },
    "llm_config": {
        "model_type": "llama_bidirec",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": False,
        # Llama-3's 128256 plus the image tokens appended after it.
        "vocab_size": 128259,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}
COLEMBED_IMAGE_TOKENS = {"<img>": 128256, "</img>": 128257, "<IMG_CONTEXT>": 128258}

_SMOKE_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def smoke_config(name: str) -> dict[str, Any]:
    """The same architecture, a few layers and a small width (CPU smoke runs)."""
    if name == "embedqa-1b-v2":
        return {**EMBEDQA_1B_V2, **_SMOKE_LLAMA}
    if name == "nv-embed-v2":
        raw = copy.deepcopy(NV_EMBED_V2)
        raw["text_config"].update(_SMOKE_LLAMA)
        raw["text_config"].pop("head_dim")
        raw["latent_attention_config"].update(
            num_latents_value=16, num_cross_heads=2, hidden_dim=64, latent_dim=64, cross_dim_head=32
        )
        return raw
    raw = copy.deepcopy(COLEMBED_3B_V1)
    raw["force_image_size"] = 64
    raw["vision_config"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    raw["vision_config"]["image_size"] = 64
    raw["llm_config"].update(_SMOKE_LLAMA)
    return raw


# ---- random weights on the device ----------------------------------------------------------


@torch.no_grad()
def materialize_(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Give a meta-device module random weights on `device` in `dtype`, without ever holding a
    float32 copy (7B parameters are 28 GB in fp32): N(0, 0.02^2) matrices and embeddings, unit
    norm weights, zero biases, as a freshly initialised transformer."""
    module.to(dtype)  # free on the meta device
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:  # RMSNorm / LayerNorm weights
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)


@dataclass
class Built:
    name: str
    backend: Backend
    backbone: BidirectionalLlama
    parameters: int
    vocab_size: int
    # ColEmbed only: the prompt's image token ids and the spec that tiles pages.
    spec: ColEmbedSpec | None = None


class _Vocab:
    """The few tokenizer lookups ColEmbedSpec makes, answered from COLEMBED_IMAGE_TOKENS."""

    unk_token_id = None
    pad_token_id = None
    eos_token_id = COLEMBED_3B_V1["llm_config"]["eos_token_id"]

    def convert_tokens_to_ids(self, token: str) -> int:
        return COLEMBED_IMAGE_TOKENS[token]


def build(name: str, device: torch.device, dtype: torch.dtype, smoke: bool, seed: int = 0) -> Built:
    """One model behind its real serving backend (its own `forward`), with random weights.

    The backend object is created without its checkpoint-reading constructor and given the
    fields its `forward` uses, so every batch runs exactly the serving code."""
    official = {
        "embedqa-1b-v2": EMBEDQA_1B_V2,
        "nv-embed-v2": NV_EMBED_V2,
        "colembed-3b": COLEMBED_3B_V1,
    }[name]
    raw = smoke_config(name) if smoke else copy.deepcopy(official)
    attn = pick_attn_implementation(device)
    if dtype not in (torch.float16, torch.bfloat16):
        attn = "sdpa"  # flash-attention kernels exist for half types only
    spec = None
    if name == "embedqa-1b-v2":
        backend: Backend = EmbedQABackend.__new__(EmbedQABackend)
        with torch.device("meta"):
            model: nn.Module = BidirectionalLlama(llama_config(raw, attn))
        backbone = model
        backend.pad_id = 0  # type: ignore[attr-defined]
        vocab = int(raw["vocab_size"])
    elif name == "nv-embed-v2":
        backend = NVEmbedBackend.__new__(NVEmbedBackend)
        with torch.device("meta"):
            model = NVEmbed(raw, attn)
        backbone = model.embedding_model
        backend.pad_id = 2  # type: ignore[attr-defined]
        vocab = int(raw["text_config"]["vocab_size"])
    else:
        backend = ColEmbedBackend.__new__(ColEmbedBackend)
        spec = ColEmbedSpec.from_config(raw, _Vocab())
        with torch.device("meta"):
            model = ColEmbed(raw, attn, img_context_id=spec.img_context_id)
        backbone = model.backbone
        backend.spec = spec  # type: ignore[attr-defined]
        vocab = COLEMBED_IMAGE_TOKENS["<img>"]  # text ids stay below the image tokens
    materialize_(model, device, dtype, seed)
    if isinstance(model, ColEmbed):
        model.reset_buffers(device)
    else:
        model.reset_rotary(device)
    model.eval()
    backend.model = model  # type: ignore[attr-defined]
    backend.device, backend.dtype = device, dtype
    n_params = sum(p.numel() for p in model.parameters())
    return Built(name, backend, backbone, n_params, vocab, spec)
