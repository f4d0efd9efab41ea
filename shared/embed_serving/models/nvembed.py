"""NV-Embed-v2: bidirectional Mistral + latent-attention pooling, without remote code.

Parameter names are those of NVIDIA's `modeling_nvembed.py` (revision c50d55f4):

- `embedding_model.*`: Mistral-7B run as an encoder (no causal mask, no sliding window). Mistral
  is the Llama computation, so it is `BidirectionalLlama`.
- `latent_attention_model.*`: every token's hidden state is a query that cross-attends to 512
  learned `latents` (keys/values, no mask), then a GEGLU feed-forward; each has a LayerNorm
  pre-norm and a residual. The result is averaged over the pooled tokens and L2-normalised.

The official `encode` recipe (`encode_texts` below) appends `</s>` to `instruction + text` and
excludes the first `len(tokenizer.tokenize(instruction))` positions from the mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embed_serving.checkpoint import (
    CheckpointError,
    load_strict,
    pick_attn_implementation,
    read_config,
)
from embed_serving.models.llama import BidirectionalLlama, llama_config
from embed_serving.tiny import randomize_, save_weights, write_json

# `LatentAttentionConfig.__init__` defaults in the official code. `save_pretrained` writes only
# the keys that differ from these, so the real checkpoint's `latent_attention_config` is nearly
# empty and these are what NV-Embed-v2 actually uses (its tensors: to_q 32768x4096 = 8 heads x
# 4096, latents 512x4096). `load_strict` catches any disagreement with the tensors.
LATENT_ATTENTION_DEFAULTS: dict[str, Any] = {
    "num_latents_value": 512,
    "num_cross_heads": 8,
    "output_normalize": True,
    "hidden_dim": 4096,
    "latent_dim": 4096,
    "cross_dim_head": 4096,
}
# `FeedForward(dim, mult=4)` is hard-coded in the official code, not configurable.
FF_MULT = 4


def latent_attention_settings(raw_config: dict[str, Any]) -> dict[str, Any]:
    """The nested `latent_attention_config` completed with the official defaults."""
    return {**LATENT_ATTENTION_DEFAULTS, **(raw_config.get("latent_attention_config") or {})}


class PreNorm(nn.Module):
    """LayerNorm on the input (and on the cross-attention context), then `fn`."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.norm_context is None:
            return self.fn(x)
        return self.fn(x, self.norm_context(context))


class CrossAttention(nn.Module):
    """Multi-head attention of `x` (queries) over `context` (keys/values), no mask, no biases."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (N, D) tokens; context: (L, D) latents shared by every token.
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(0, 1)  # (h, N, d)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.unflatten(-1, (self.heads, -1)).transpose(0, 1)  # (h, L, d)
        v = v.unflatten(-1, (self.heads, -1)).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale d^-0.5, as the official code
        return self.to_out(out.transpose(0, 1).flatten(-2))


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = FF_MULT) -> None:
        super().__init__()
        # Indices 0 and 2 carry the weights: `net.0.*`, `net.2.*` in the checkpoint.
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LatentAttention(nn.Module):
    """`cross_attend_blocks.0` (cross-attention), `cross_attend_blocks.1` (FF), `latents`."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__()
        dim = int(settings["hidden_dim"])
        latent_dim = int(settings["latent_dim"])
        heads = int(settings["num_cross_heads"])
        dim_head = int(settings["cross_dim_head"])
        self.cross_attend_blocks = nn.ModuleList(
            [
                PreNorm(latent_dim, CrossAttention(latent_dim, dim, heads, dim_head), dim),
                PreNorm(latent_dim, FeedForward(latent_dim)),
            ]
        )
        self.latents = nn.Parameter(torch.empty(int(settings["num_latents_value"]), latent_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, D) token hidden states -> (N, D). Each token is transformed independently."""
        cross_attn, cross_ff = self.cross_attend_blocks
        # Cast to the block's own dtype: the backbone may run in another one (no autocast here).
        tokens = tokens.to(self.latents.dtype)
        tokens = cross_attn(tokens, self.latents) + tokens
        return cross_ff(tokens) + tokens


class NVEmbed(nn.Module):
    """NV-Embed-v2 with the official parameter names (`embedding_model.*`,
    `latent_attention_model.*`)."""

    def __init__(self, raw_config: dict[str, Any], attn_implementation: str = "sdpa") -> None:
        super().__init__()
        text = raw_config["text_config"]
        settings = latent_attention_settings(raw_config)
        hidden = int(text["hidden_size"])
        # The official block layer-norms the hidden states with `latent_dim` and feeds the latents
        # through a `hidden_dim` context norm, so it only runs when all three sizes agree.
        if not hidden == int(settings["hidden_dim"]) == int(settings["latent_dim"]):
            raise CheckpointError(
                f"latent_attention_config hidden_dim={settings['hidden_dim']} and "
                f"latent_dim={settings['latent_dim']} must equal text_config.hidden_size={hidden}"
            )
        self.settings = settings
        # The official `encode` masks the instruction only under these settings (both default on).
        self.mask_instruction = bool(raw_config.get("is_mask_instruction", True)) and (
            raw_config.get("padding_side", "right") == "right"
        )
        self.embedding_model = BidirectionalLlama(llama_config(text, attn_implementation))
        self.latent_attention_model = LatentAttention(settings)

    def reset_rotary(self, device: torch.device) -> None:
        self.embedding_model.reset_rotary(device)

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """Latent attention + masked mean + L2 norm: (B, T, D) -> (B, D) float32.

        The latents are keys/values and nothing is masked, so each token's output depends on that
        token alone: running the block on the pooled tokens only (no padding, no instruction) is
        exact and spares the wasted work. Sums are in fp32 whatever the model dtype.
        """
        keep = pool_mask.bool()
        counts = keep.sum(dim=1)
        if bool((counts == 0).any()):
            # The official code would divide by zero and return NaN.
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"rows {rows} have no pooled token (instruction fills max_length?)")
        out = hidden.new_zeros(hidden.shape, dtype=torch.float32)
        out[keep] = self.latent_attention_model(hidden[keep]).to(torch.float32)
        pooled = out.sum(dim=1) / counts.unsqueeze(-1).to(torch.float32)
        # The model card normalises after `encode` in any case, so output_normalize is moot.
        return F.normalize(pooled, p=2, dim=-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embedding_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(hidden, pool_mask)


def load_nvembed(
    checkpoint_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
) -> NVEmbed:
    """Build on the meta device, load every tensor strictly, ready for inference.

    All weights (the latent block included) take `dtype`; pooling sums and the output are fp32.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if attn_implementation is None:
        attn_implementation = pick_attn_implementation(device)
        # flash-attention kernels exist for half types only.
        if dtype not in (torch.float16, torch.bfloat16):
            attn_implementation = "sdpa"
    with torch.device("meta"):
        model = NVEmbed(read_config(checkpoint_dir), attn_implementation)
    load_strict(model, checkpoint_dir, device, dtype)
    model.reset_rotary(device)
    return model.eval()


def instruction_length(tokenizer: Any, instruction: str) -> int:
    """Leading positions the official `encode` leaves out of the mean.

    `tokenize` adds no `<s>`, yet the count is applied from position 0 of ids that start with
    `<s>`, so BOS and the instruction's first n-1 tokens are excluded. For the usual
    "...Query: " instructions the last token is the trailing space, which merges into the first
    text token anyway; an instruction without one leaves its last token pooled. Kept as is:
    the released embeddings were made this way.
    """
    return len(tokenizer.tokenize(instruction)) if instruction else 0


def prepare_batch(
    tokenizer: Any,
    texts: list[str],
    instruction: str,
    max_length: int,
    mask_instruction: bool = True,
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `pool_mask` exactly as the official `encode` builds them."""
    if tokenizer.padding_side != "right":
        # Left padding would shift both the instruction mask and the RoPE positions.
        raise ValueError("NV-Embed needs a right-padding tokenizer")
    strings = [instruction + text + tokenizer.eos_token for text in texts]
    batch = tokenizer(
        strings,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    pool_mask = batch["attention_mask"].clone()
    if mask_instruction:
        pool_mask[:, : instruction_length(tokenizer, instruction)] = 0
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pool_mask": pool_mask,
    }


@torch.inference_mode()
def encode_texts(
    model: NVEmbed, tokenizer: Any, texts: list[str], instruction: str, max_length: int
) -> torch.Tensor:
    """The official `encode` on one padded batch: (len(texts), hidden) float32, L2-normalised."""
    device = next(model.parameters()).device
    batch = prepare_batch(tokenizer, texts, instruction, max_length, model.mask_instruction)
    return model(**{k: v.to(device) for k, v in batch.items()})


# ---------------------------------------------------------------------------------------------
# Tiny random-weight checkpoints in the official layout (demos and tests; scores are meaningless)

_TINY_CORPUS = """\
Retrieval systems turn questions and passages into vectors so that related texts lie close.
A search engine first indexes a large collection of documents, then answers queries quickly.
The capital of Australia is Canberra, a planned city between Sydney and Melbourne.
Vaccines train the immune system to recognise a pathogen without causing the disease.
Photosynthesis lets plants convert sunlight, water and carbon dioxide into sugar and oxygen.
Mitochondria are the power houses of the cell and produce most of its chemical energy.
Lighthouses have guided sailors along dangerous coasts for more than two thousand years.
How many calories are burned during a thirty minute jog at a moderate pace?
Explain the difference between TCP and UDP in computer networking and give examples.
What is the best way to learn a new language: reading, speaking, or listening every day?
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Given a question, retrieve passages that answer the question. Instruct: Query: Passage:
Numbers such as 1, 2, 3, 10, 42, 100, 2024 and 3.14 appear in many technical documents.
Models are trained on examples, evaluated on held out data, and deployed behind an API.
"""

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_SPECIALS = ["<unk>", "<s>", "</s>"]
# Upper bound; the corpus runs out of merges a little below it.
_TINY_VOCAB = 1000


def _tiny_tokenizer() -> Any:
    """A Llama-layout BPE tokenizer (ids 0-2 specials, 256 byte-fallback tokens, then merges)
    trained in memory on `_TINY_CORPUS`; deterministic, no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from tokenizers.trainers import BpeTrainer

    # Llama's (legacy) layout: spaces become "▁" and one is prepended; no pre-tokenizer.
    normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizer
    # Split words only while training so that no merge spans a word boundary.
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    alphabet = sorted({c for c in _TINY_CORPUS if c not in " \n"} | set("\u2581"))
    trainer = BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(
        (i, t) for t, i in trained["vocab"].items() if t not in _SPECIALS and t not in _BYTE_TOKENS
    )
    vocab = {t: i for i, t in enumerate(_SPECIALS + _BYTE_TOKENS + [t for _, t in learned])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizer
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIALS])
    tok.post_processor = TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


def _tiny_config(vocab_size: int) -> dict[str, Any]:
    hidden = 32
    text = {
        "_name_or_path": "nvidia/NV-Embed-v2",
        "architectures": ["MistralModel"],
        "model_type": "bidir_mistral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    return {
        "add_eos": True,
        "add_pad_token": True,
        "architectures": ["NVEmbedModel"],
        "auto_map": {
            "AutoConfig": "configuration_nvembed.NVEmbedConfig",
            "AutoModel": "modeling_nvembed.NVEmbedModel",
        },
        "hidden_size": hidden,
        "is_mask_instruction": True,
        # Only non-default keys, as `save_pretrained` writes them.
        "latent_attention_config": {
            "cross_dim_head": 16,
            "hidden_dim": hidden,
            "latent_dim": hidden,
            "model_type": "latent_attention",
            "num_cross_heads": 2,
            "num_latents_value": 16,
        },
        "mask_type": "b",
        "model_type": "nvembed",
        "padding_side": "right",
        "text_config": text,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
    }


def write_tiny_checkpoint(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny random-weight NV-Embed-v2 checkpoint in the official layout: config.json
    (with `auto_map`), model.safetensors (official names), tokenizer files. It runs the real
    code path, but its embeddings mean nothing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    config = _tiny_config(tok.get_vocab_size(with_added_tokens=True))
    model = NVEmbed(config)
    randomize_(model, seed)
    save_weights(model, out_dir)
    write_json(out_dir / "config.json", config)

    tok.save(str(out_dir / "tokenizer.json"))
    special = {
        "content": "",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    special_map = {
        "bos_token": {**special, "content": "<s>"},
        "eos_token": {**special, "content": "</s>"},
        "pad_token": {**special, "content": "</s>"},
        "unk_token": {**special, "content": "<unk>"},
    }
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {**special, "content": t, "special": True} for i, t in enumerate(_SPECIALS)
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 32768,
        "pad_token": "</s>",
        "padding_side": "right",
        # Not "LlamaTokenizer" as in the real file: transformers 5 rebuilds that class's
        # normalizer (Metaspace), which tokenizes leading whitespace differently from
        # tokenizer.json; PreTrainedTokenizerFast loads tokenizer.json verbatim.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    write_json(out_dir / "special_tokens_map.json", special_map)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
