"""Tiny random-weight checkpoints in the official layouts, for demos, tests and smoke-testing a
deployment without downloading gigabytes. They run the real code path; their outputs are
meaningless (random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

# Enough English for a BPE vocabulary of a few hundred merges; the demo and tests use words
# from here so that tokenisation is not all single bytes.
CORPUS = (
    """\
Photosynthesis converts light energy into chemical energy stored in glucose.
Mitochondria are the powerhouse of the cell and produce ATP through respiration.
The Eiffel Tower is a wrought-iron lattice tower in Paris, France.
Retrieval augmented generation combines a search index with a language model.
Embeddings map text and images to vectors; similar meanings land close together.
How do plants make energy? What is the capital of France? Who wrote the report?
Quarterly revenue grew twelve percent while operating costs fell in every region.
The chart shows sales by region; the table lists the top ten products by margin.
Neural networks learn representations from data with gradient descent and backpropagation.
A query is embedded and compared with passages to rank the most relevant documents first.
"""
    * 4
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


def build_llama3_style_tokenizer(
    out_dir: Path, vocab_size: int = 600, extra_specials: tuple[str, ...] = ()
) -> int:
    """A byte-level BPE tokenizer shaped like Llama 3's: BOS added by the post-processor, no
    EOS, pad = `<|end_of_text|>`, loaded as PreTrainedTokenizerFast. Returns its vocab size."""
    specials = LLAMA3_SPECIALS + list(extra_specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": specials[1], "pad_token": specials[1]}
    tokenizer_config: dict[str, Any] = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
    }
    if extra_specials:
        tokenizer_config["additional_special_tokens"] = list(extra_specials)
        special_map = {**special_map, "additional_special_tokens": list(extra_specials)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return tok.get_vocab_size()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """O(1)-scale random weights (the golden fixtures' recipe), so that attention is far from
    uniform and every component changes the output: matrices N(0, 1/fan_in), embeddings and
    other vectors-of-vectors N(0, 1), norms U(0.5, 1.5), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters()):
        shape = param.shape
        if "norm" in name or name.endswith(("ln.weight", "layernorm.weight")):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif "embed" in name or param.dim() != 2:
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
        param.copy_(value.to(param.dtype))


def save_checkpoint(module: nn.Module, config: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_embedqa(out_dir: Path, seed: int = 0) -> None:
    """llama_bidirec layout: `embed_tokens`, `layers.N.*`, `norm`, no LM head (tied)."""
    from embed_serving.models.llama import BidirectionalLlama, llama_config

    vocab = build_llama3_style_tokenizer(out_dir)
    config: dict[str, Any] = {
        "architectures": ["LlamaBidirectionalModel"],
        "auto_map": {
            "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
            "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel",
        },
        "model_type": "llama_bidirec",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pooling": "avg",
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    }
    model = BidirectionalLlama(llama_config(config, "sdpa"))
    randomize_(model, seed)
    save_checkpoint(model, config, out_dir)
