"""Tiny random-weight checkpoints in the official layouts, for demos, tests and smoke-testing a
deployment without downloading gigabytes. They run the real code path; their outputs are
meaningless (random weights). The pieces every model's writer shares live here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from torch import nn

# Enough text for a BPE vocabulary of several hundred merges, so that tokenisation is not all
# single bytes.
CORPUS = """\
What was the total revenue reported in the third quarter of 2023?
The chart on page four compares quarterly revenue, operating income and net margin.
Figure 2: Distribution of response times across all regions, in milliseconds.
Table 1 lists the model sizes, training tokens and evaluation scores for each variant.
Retrieval-augmented generation combines a retriever with a language model.
The quick brown fox jumps over the lazy dog near the river bank.
Invoices must be paid within thirty days of the date shown on the first page.
How many employees worked at the Berlin office at the end of the year?
Scanned documents, slides, charts, tables and infographics are indexed as page images.
Late interaction scores each query token against every document token and sums the maxima.
The committee approved the budget of 1,250,000 dollars for the 2024 fiscal year.
Section 3.2 describes the experimental setup; results follow in section 4.
"""

LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3's pre-tokenisation regex (from its tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Parameters drawn N(0, 1) rather than N(0, 1/fan_in): vectors looked up or attended to as they
# are (token / position embeddings, SigLIP's probe, NV-Embed's latents).
_UNIT_SCALE = ("embed_tokens.weight", "position_embedding.weight", "head.probe", "latents")


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_llama3_tokenizer(
    out_dir: Path, specials: tuple[str, ...] = (LLAMA3_BOS, LLAMA3_EOS), vocab_target: int = 1024
) -> int:
    """A small Llama-3-style byte-level BPE tokenizer: Llama 3's split regex, `specials` added
    after the learned vocab (BOS first, EOS second, then e.g. image tokens), BOS added by the
    post-processor, no EOS, pad = EOS, loaded as PreTrainedTokenizerFast. Returns its size
    (added tokens included)."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    # Specials go after the learned vocab, as in Llama 3 (128000+) and Eagle's added tokens.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos, eos = specials[0], specials[1]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            ),
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    added = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in specials
    }
    tokenizer_config = {
        "added_tokens_decoder": added,
        **special_map,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", special_map)
    return tok.get_vocab_size(with_added_tokens=True)


def tiny_llama_config(
    vocab_size: int, *, hidden: int = 32, layers: int = 2, bos_token_id: int, eos_token_id: int
) -> dict[str, Any]:
    """The Llama keys of a tiny bidirectional Llama-3.2-style backbone (GQA, explicit head_dim,
    llama3 RoPE scaling), shared by the embedqa and ColEmbed layouts."""
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": hidden // 4,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "vocab_size": vocab_size,
    }


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """Re-draw every parameter at O(1) scale (the golden fixtures' recipe), in sorted-name order
    from one seeded generator, so that attention is far from uniform and every ingredient of the
    forward pass moves the outputs: matrices N(0, 1/fan_in), embeddings N(0, 1), norm weights
    U(0.5, 1.5), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters()):
        if name.endswith(_UNIT_SCALE):
            new = torch.randn(param.shape, generator=gen)
        elif name.endswith("bias"):
            new = torch.randn(param.shape, generator=gen) * 0.1
        elif param.ndim == 1:  # LayerNorm / RMSNorm weights
            new = torch.rand(param.shape, generator=gen) + 0.5
        else:  # Linear (out, in), Conv2d (out, in, k, k), MHA in_proj (3h, h)
            fan_in = math.prod(param.shape[1:])
            new = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
        param.copy_(new)


def save_weights(module: nn.Module, out_dir: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_embedqa(out_dir: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> None:
    """llama_bidirec layout: `embed_tokens`, `layers.N.*`, `norm`, no LM head (tied). `hidden`
    and `layers` size it (benchmarks want a model whose forward pass is not free)."""
    from embed_serving.models.llama import BidirectionalLlama, llama_config

    vocab = write_llama3_tokenizer(out_dir)
    added = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    config: dict[str, Any] = {
        "architectures": ["LlamaBidirectionalModel"],
        "auto_map": {
            "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
            "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel",
        },
        "model_type": "llama_bidirec",
        **tiny_llama_config(
            vocab, hidden=hidden, layers=layers,
            bos_token_id=ids[LLAMA3_BOS], eos_token_id=ids[LLAMA3_EOS],
        ),  # fmt: skip
        "pooling": "avg",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    model = BidirectionalLlama(llama_config(config, "sdpa"))
    randomize_(model, seed)
    save_weights(model, out_dir)
    write_json(out_dir / "config.json", config)
