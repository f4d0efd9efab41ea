"""ColEmbed-3B (nvidia/llama-nemoretriever-colembed-3b-v1) as a native multi-vector encoder.

An Eagle2-style vision-language model used as a ColBERT encoder: a SigLIP vision tower encodes
each image tile, InternVL's pixel shuffle folds 2x2 patch neighbourhoods into the channels, the
`mlp1` projector maps them to the LLM width, and the projected tokens replace the
`<IMG_CONTEXT>` placeholders of the prompt. A bidirectional Llama-3.2 stack (no LM head) then
gives one L2-normalised vector per token.

NVIDIA's v1 modeling code could not be obtained. What is VERIFIED below comes from its published
siblings: Eagle2's `Eagle2ChatModel` (pixel shuffle, `extract_feature`, `mlp1`, the splice of
vision tokens by `<IMG_CONTEXT>` id, `num_image_token`) and NVIDIA's later
`LlamaNemotronVLModel` / `LlamaNemotronVLProcessor` from the same retriever line (template
`bidirectional-llama-retriever`, `query:` / `passage:` prefixes joined by one space, the
`<image>`-then-text passage order, a `LlamaBidirectionalModel` backbone, a "colbert" pooling
that keeps every token). Everything marked INFERRED is a best reading of those, not a copy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from embed_serving import tiling
from embed_serving.checkpoint import (
    CheckpointError,
    load_strict,
    load_tokenizer,
    pick_attn_implementation,
    read_config,
    tensor_names,
)
from embed_serving.models.llama import BidirectionalLlama, llama_config
from embed_serving.tiny import (
    LLAMA3_BOS,
    LLAMA3_EOS,
    randomize_,
    tiny_llama_config,
    write_json,
    write_llama3_tokenizer,
)

logger = logging.getLogger(__name__)

# --- parameter layout -------------------------------------------------------------------------

# INFERRED: where the checkpoint keeps the Llama backbone. NVIDIA's retriever VLMs build
# `self.language_model = LlamaBidirectionalModel(llm_config)` (a LlamaModel, no LM head), which
# names tensors `language_model.embed_tokens.weight`, `language_model.layers.N.*`,
# `language_model.norm.weight` (as NVIDIA's own state-dict adapter for that family spells them).
LLM_PREFIX = "language_model."
# Eagle2 / InternVL chat checkpoints wrap the backbone in LlamaForCausalLM instead:
# `language_model.model.*` plus `language_model.lm_head.weight`. `load_colembed` detects this
# layout from the tensor names, so either loads strictly.
LLM_PREFIX_CAUSAL_LM = "language_model.model."
# An LM head is never run by an encoder; if a checkpoint carries one it is skipped by name.
LM_HEAD_PREFIX = "language_model.lm_head."
# Eagle2 builds `self.vision_model = SiglipVisionModel(...)`, whose transformers-4 layout nests
# another `vision_model`: `vision_model.vision_model.{embeddings,encoder,post_layernorm,head}.*`.
VISION_PREFIX = "vision_model.vision_model."

# --- prompt format ----------------------------------------------------------------------------

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# NVIDIA's processor joins `query_prefix` / `passage_prefix` ("query:" / "passage:") to the
# content with one space; the `bidirectional-llama-retriever` template adds nothing around it.
QUERY_PREFIX = "query:"
PASSAGE_PREFIX = "passage:"
KNOWN_TEMPLATES = {"bidirectional-llama-retriever"}
DEFAULT_QUERY_MAX_TOKENS = 512
DEFAULT_PASSAGE_MAX_TOKENS = 10240

# `norm_type` of InternVL-family processors; ColEmbed uses SigLIP's (maps [0, 1] to [-1, 1]).
_NORMS = {
    "siglip": (tiling.IMAGE_MEAN, tiling.IMAGE_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Bookkeeping keys of remote-code configs that a transformers config class must not see.
_VISION_DROP_KEYS = {"auto_map", "architectures", "transformers_version", "_name_or_path"}


def build_query_text(text: str, prefix: str = QUERY_PREFIX) -> str:
    """The exact string tokenised for a query: `query: {text}`."""
    return f"{prefix} {text}"


def build_passage_text(
    text: str | None, n_image_tokens: int | None, prefix: str = PASSAGE_PREFIX
) -> str:
    """The exact string tokenised for a passage.

    Text only: `passage: {text}`. With an image: `passage: <img>` + `<IMG_CONTEXT>` x
    `n_image_tokens` + `</img> ` + optional text (NVIDIA's processor puts `<image> ` before the
    text and then expands `<image>`).
    """
    if not n_image_tokens:
        if text is None:
            raise ValueError("a passage needs text, an image, or both")
        return f"{prefix} {text}"
    image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * n_image_tokens + IMG_END_TOKEN
    return f"{prefix} {image} {text or ''}"


# --- config -----------------------------------------------------------------------------------


def _llm_raw(raw: dict[str, Any]) -> dict[str, Any]:
    llm = raw.get("llm_config") or raw.get("text_config")
    if not isinstance(llm, dict):
        raise CheckpointError(
            "config.json has no llm_config (or text_config) for the Llama backbone"
        )
    return llm


def _vision_config(raw: dict[str, Any], attn_implementation: str) -> SiglipVisionConfig:
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise CheckpointError("config.json has no vision_config")
    model_type = vision.get("model_type", "siglip_vision_model")
    # Only the fixed-resolution SigLIP / SigLIP2 tower (siglip2-giant-opt-patch16-384 is one) is
    # this architecture; Eagle's multi-backbone towers and SigLIP2-NaFlex are not.
    if model_type not in {"siglip_vision_model", "siglip"}:
        raise CheckpointError(f"unsupported vision tower model_type {model_type!r}")
    kwargs = {k: v for k, v in vision.items() if k not in _VISION_DROP_KEYS}
    kwargs.pop("model_type", None)
    kwargs.pop("torch_dtype", None)
    config = SiglipVisionConfig(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def _image_size(raw: dict[str, Any]) -> int:
    # Eagle2: `image_size = config.force_image_size or config.vision_config.image_size`.
    return int(raw.get("force_image_size") or raw["vision_config"]["image_size"])


def _shuffle_factor(downsample_ratio: float) -> int:
    factor = round(1 / downsample_ratio)
    if factor < 1 or not math.isclose(downsample_ratio * factor, 1.0):
        raise CheckpointError(f"downsample_ratio {downsample_ratio} is not 1/integer")
    return factor


def _tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    grid = image_size // patch_size
    factor = _shuffle_factor(downsample_ratio)
    if grid % factor:
        raise CheckpointError(
            f"patch grid {grid} is not divisible by pixel-shuffle factor {factor}"
        )
    # Eagle2: int((image_size // patch_size) ** 2 * downsample_ratio ** 2).
    return (grid // factor) ** 2


@dataclass(frozen=True)
class ColEmbedSpec:
    """Everything the serving code needs, read from config.json and the tokenizer."""

    image_size: int
    patch_size: int
    downsample_ratio: float
    tokens_per_tile: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    img_start_id: int
    img_end_id: int
    img_context_id: int
    hidden_size: int
    vocab_size: int
    pad_token_id: int
    query_prefix: str
    passage_prefix: str
    query_max_tokens: int
    passage_max_tokens: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    template: str | None

    @classmethod
    def from_config(cls, raw: dict[str, Any], tokenizer: Any) -> ColEmbedSpec:
        llm = _llm_raw(raw)
        vision = raw.get("vision_config") or {}
        image_size = _image_size(raw)
        patch_size = int(vision["patch_size"])
        downsample_ratio = float(raw.get("downsample_ratio", 0.5))
        # Eagle2 configs name the tile cap `max_dynamic_patch`; NVIDIA's retriever configs and
        # processors use `max_input_tiles`, which wins when both exist.
        max_tiles = raw.get("max_input_tiles") or raw.get("max_dynamic_patch")
        if not max_tiles:
            raise CheckpointError("config.json has neither max_input_tiles nor max_dynamic_patch")
        min_tiles = int(raw.get("min_dynamic_patch", 1))
        max_tiles = int(max_tiles)
        if raw.get("dynamic_image_size") is False:
            # Without dynamic tiling InternVL resizes the page to one tile, no thumbnail.
            min_tiles = max_tiles = 1
        template = raw.get("template")
        if template is not None and template not in KNOWN_TEMPLATES:
            logger.warning(
                "unknown prompt template %r; prompts follow %s", template, KNOWN_TEMPLATES
            )
        norm_type = raw.get("norm_type", "siglip")
        if norm_type not in _NORMS:
            raise CheckpointError(f"unknown norm_type {norm_type!r}")
        mean, std = _NORMS[norm_type]

        vocab_size = int(llm.get("vocab_size") or raw.get("vocab_size") or 0)
        # Looked up, never hard-coded: Eagle-family tokenizers append these as added tokens.
        image_tokens = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        ids = {tok: _token_id(tokenizer, tok) for tok in image_tokens}
        for tok, tok_id in ids.items():
            if vocab_size and tok_id >= vocab_size:
                raise CheckpointError(
                    f"{tok} id {tok_id} is outside the model vocab ({vocab_size})"
                )
        configured = raw.get("img_context_token_id")
        if configured is not None and int(configured) != ids[IMG_CONTEXT_TOKEN]:
            raise CheckpointError(
                f"config img_context_token_id {configured} != tokenizer's "
                f"{IMG_CONTEXT_TOKEN} id {ids[IMG_CONTEXT_TOKEN]}"
            )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            downsample_ratio=downsample_ratio,
            tokens_per_tile=_tokens_per_tile(image_size, patch_size, downsample_ratio),
            min_tiles=min_tiles,
            max_tiles=max_tiles,
            use_thumbnail=bool(raw.get("use_thumbnail", False)),
            img_start_id=ids[IMG_START_TOKEN],
            img_end_id=ids[IMG_END_TOKEN],
            img_context_id=ids[IMG_CONTEXT_TOKEN],
            hidden_size=int(llm["hidden_size"]),
            vocab_size=vocab_size,
            pad_token_id=int(pad_id),
            query_prefix=str(raw.get("query_prefix") or QUERY_PREFIX),
            passage_prefix=str(raw.get("passage_prefix") or PASSAGE_PREFIX),
            query_max_tokens=int(raw.get("q_max_length") or DEFAULT_QUERY_MAX_TOKENS),
            passage_max_tokens=int(raw.get("p_max_length") or DEFAULT_PASSAGE_MAX_TOKENS),
            image_mean=tuple(mean),
            image_std=tuple(std),
            template=template,
        )

    def image_tokens(self, n_tiles: int) -> int:
        """Number of `<IMG_CONTEXT>` tokens an image of `n_tiles` tiles takes."""
        return n_tiles * self.tokens_per_tile

    def pixel_values(self, image: Any) -> torch.Tensor:
        """Tile and normalise one PIL image: float32 (n_tiles, 3, S, S)."""
        return tiling.image_to_pixel_values(
            image,
            self.image_size,
            self.min_tiles,
            self.max_tiles,
            self.use_thumbnail,
            mean=self.image_mean,
            std=self.image_std,
        )

    def query_text(self, text: str) -> str:
        return build_query_text(text, self.query_prefix)

    def passage_text(self, text: str | None, n_tiles: int = 0) -> str:
        return build_passage_text(text, self.image_tokens(n_tiles), self.passage_prefix)


def _token_id(tokenizer: Any, token: str) -> int:
    tok_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tok_id is None or (unk is not None and tok_id == unk):
        raise CheckpointError(f"the tokenizer has no {token} token")
    return int(tok_id)


# --- model ------------------------------------------------------------------------------------


def pixel_shuffle(x: torch.Tensor, scale_factor: float, version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle: (n, w, h, c) -> (n, w*s, h*s, c/s^2), reshapes exactly as theirs.

    With s = 1/r, output[:, i, j] concatenates input[:, r*i + di, r*j + dj] for di, dj in
    row-major order. 'v1' skips the final transpose (InternVL's legacy variant, not Eagle2's).
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor**2))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class _VisionTower(nn.Module):
    """Holds SiglipVisionModel under `vision_model` so names read `vision_model.vision_model.*`.

    (transformers 5 flattened SiglipVisionModel and renames keys at `from_pretrained`; the
    official checkpoint was written by transformers 4, where the nesting is real.)
    """

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(config)


class _CausalLMLayout(nn.Module):
    """Parameter-name shim for the Eagle2 chat layout `language_model.model.*`."""

    def __init__(self, model: BidirectionalLlama) -> None:
        super().__init__()
        self.model = model


class ColEmbed(nn.Module):
    """Vision tower + `mlp1` projector + bidirectional Llama, giving per-token vectors."""

    def __init__(
        self,
        raw_config: dict[str, Any],
        attn_implementation: str = "sdpa",
        img_context_id: int | None = None,
        llm_prefix: str = LLM_PREFIX,
    ) -> None:
        super().__init__()
        vision_config = _vision_config(raw_config, attn_implementation)
        llm_cfg = llama_config(_llm_raw(raw_config), attn_implementation)
        self.image_size = _image_size(raw_config)
        self.downsample_ratio = float(raw_config.get("downsample_ratio", 0.5))
        self.tokens_per_tile = _tokens_per_tile(
            self.image_size, vision_config.patch_size, self.downsample_ratio
        )
        self.select_layer = int(raw_config.get("select_layer", -1))
        self.ps_version = str(raw_config.get("ps_version", "v2"))
        # A `force_image_size` other than the tower's own resolution needs resampled position
        # embeddings (InternVL resizes them at load; SigLIP interpolates bicubically the same way).
        self.interpolate_pos = self.image_size != vision_config.image_size
        if img_context_id is None and raw_config.get("img_context_token_id") is not None:
            img_context_id = int(raw_config["img_context_token_id"])
        self.img_context_id = img_context_id

        self.vision_model = _VisionTower(vision_config)
        factor = _shuffle_factor(self.downsample_ratio)
        vit_width = vision_config.hidden_size * factor**2
        llm_width = llm_cfg.hidden_size
        # Eagle2's projector, verbatim in structure (nn.LayerNorm / nn.GELU defaults).
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_width),
            nn.Linear(vit_width, llm_width),
            nn.GELU(),
            nn.Linear(llm_width, llm_width),
        )
        backbone = BidirectionalLlama(llm_cfg)
        if llm_prefix == LLM_PREFIX:
            self.language_model: nn.Module = backbone
        elif llm_prefix == LLM_PREFIX_CAUSAL_LM:
            self.language_model = _CausalLMLayout(backbone)
        else:
            raise ValueError(f"unknown language model prefix {llm_prefix!r}")
        self.llm_prefix = llm_prefix
        self.hidden_size = llm_width

    @property
    def backbone(self) -> BidirectionalLlama:
        lm = self.language_model
        return lm.model if isinstance(lm, _CausalLMLayout) else lm  # type: ignore[return-value]

    def reset_buffers(self, device: torch.device) -> None:
        """Rebuild buffers that are not in the checkpoint (RoPE tables, SigLIP position ids);
        a model built on the meta device has none."""
        self.backbone.reset_rotary(device)
        embeddings = self.vision_model.vision_model.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand(
            (1, -1)
        )

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles (n, 3, S, S) -> projected image tokens (n, tokens_per_tile, llm hidden)."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (
            self.image_size,
            self.image_size,
        ):
            raise ValueError(
                f"pixel_values must be (n_tiles, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        tower = self.vision_model.vision_model
        x = pixel_values.to(tower.embeddings.patch_embedding.weight.dtype)
        hidden = tower.embeddings(x, interpolate_pos_encoding=self.interpolate_pos)
        layers = tower.encoder.layers
        # Eagle2: select_layer -1 -> last_hidden_state (after post_layernorm); otherwise
        # hidden_states[select_layer], where hidden_states[0] is the embedding output. The tower
        # is run layer by layer so the unused pooling head is never computed.
        stop = len(layers) if self.select_layer == -1 else self.select_layer % (len(layers) + 1)
        for layer in layers[:stop]:
            hidden = layer(hidden, None)
        if self.select_layer == -1:
            hidden = tower.post_layernorm(hidden)
        n, length, width = hidden.shape
        side = math.isqrt(length)
        hidden = hidden.reshape(n, side, side, width)
        hidden = pixel_shuffle(hidden, self.downsample_ratio, self.ps_version)
        hidden = hidden.reshape(n, -1, hidden.shape[-1])
        return self.mlp1(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token L2-normalised float32 vectors (B, T, H); padding positions are zero.

        Inputs are right-padded. `pixel_values` holds every tile of every image in the batch, in
        order of appearance; each image's `<IMG_CONTEXT>` run must be exactly its tiles x
        tokens_per_tile long, since the vision tokens fill the placeholders in reading order.
        """
        backbone = self.backbone
        embeds = backbone.embed_tokens(input_ids)
        n_tiles = 0 if pixel_values is None else int(pixel_values.shape[0])
        if self.img_context_id is None:
            if n_tiles:
                raise ValueError("img_context_id is unknown, so images cannot be placed")
        else:
            is_context = input_ids == self.img_context_id
            n_context = int(is_context.sum())
            if n_context != n_tiles * self.tokens_per_tile:
                raise ValueError(
                    f"{n_context} {IMG_CONTEXT_TOKEN} tokens but {n_tiles} tiles x "
                    f"{self.tokens_per_tile} tokens per tile = {n_tiles * self.tokens_per_tile}"
                )
            if n_tiles:
                vit = self.extract_feature(pixel_values).to(embeds.dtype)
                embeds = embeds.masked_scatter(is_context.unsqueeze(-1), vit)
        hidden = backbone(attention_mask=attention_mask, inputs_embeds=embeds)
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        return F.normalize(hidden.to(torch.float32), dim=-1) * mask


# --- loading ----------------------------------------------------------------------------------


def detect_llm_prefix(keys: list[str]) -> str:
    """Which of the two known backbone layouts the tensor names use (see LLM_PREFIX)."""
    if any(k.startswith(LLM_PREFIX_CAUSAL_LM) for k in keys):
        return LLM_PREFIX_CAUSAL_LM
    return LLM_PREFIX


def load_colembed(
    checkpoint_dir: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    tokenizer: Any | None = None,
    attn_implementation: str | None = None,
) -> tuple[ColEmbed, ColEmbedSpec]:
    """Build ColEmbed from `checkpoint_dir`'s config and load its weights strictly."""
    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device(device)
    raw = read_config(checkpoint_dir)
    if tokenizer is None:
        tokenizer = load_tokenizer(checkpoint_dir)
    spec = ColEmbedSpec.from_config(raw, tokenizer)
    prefix = detect_llm_prefix(tensor_names(checkpoint_dir))
    attn = attn_implementation or pick_attn_implementation(device)
    with torch.device("meta"):
        model = ColEmbed(raw, attn, img_context_id=spec.img_context_id, llm_prefix=prefix)
    try:
        load_strict(model, checkpoint_dir, device, dtype, ignore=(LM_HEAD_PREFIX,))
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. Expected ColEmbed layout: '{VISION_PREFIX}*', 'mlp1.{{0,1,3}}.*', "
            f"language model under '{prefix}*' (LLM_PREFIX in {__name__})"
        ) from err
    model.reset_buffers(device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors left uninitialised after loading: {leftovers[:8]}")
    return model.eval(), spec


# --- tiny random checkpoints ------------------------------------------------------------------

_SPECIAL_TOKENS = (LLAMA3_BOS, LLAMA3_EOS, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)


def tiny_config(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    llm_hidden: int = 32,
    llm_layers: int = 2,
    max_tiles: int = 4,
    bos_token_id: int = 0,
    eos_token_id: int = 0,
) -> dict[str, Any]:
    """config.json of a tiny checkpoint in the (INFERRED) official layout."""
    # INFERRED names: NVIDIA's remote-code module is modeling_llama_nemoretrievercolembed.py with
    # class llama_NemoRetrieverColEmbed (seen in third-party loaders); model_type is a guess.
    return {
        "architectures": ["llama_NemoRetrieverColEmbed"],
        "auto_map": {
            "AutoConfig": "configuration_llama_nemoretrievercolembed."
            "llama_NemoRetrieverColEmbedConfig",
            "AutoModel": "modeling_llama_nemoretrievercolembed.llama_NemoRetrieverColEmbed",
        },
        "model_type": "llama_nemoretrievercolembed",
        "bidirectional_attention": True,
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": max_tiles,
        "max_input_tiles": max_tiles,
        "min_dynamic_patch": 1,
        "norm_type": "siglip",
        "p_max_length": DEFAULT_PASSAGE_MAX_TOKENS,
        "passage_prefix": PASSAGE_PREFIX,
        "pooling": "colbert",
        "ps_version": "v2",
        "q_max_length": DEFAULT_QUERY_MAX_TOKENS,
        "query_prefix": QUERY_PREFIX,
        "select_layer": -1,
        "template": "bidirectional-llama-retriever",
        "torch_dtype": "float32",
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "attention_dropout": 0.0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": vision_hidden,
            "image_size": image_size,
            "intermediate_size": vision_hidden * 2,
            "layer_norm_eps": 1e-06,
            "num_attention_heads": 2,
            "num_channels": 3,
            "num_hidden_layers": vision_layers,
            "patch_size": patch_size,
        },
        "llm_config": {
            "architectures": ["LlamaBidirectionalModel"],
            "model_type": "llama_bidirec",
            **tiny_llama_config(
                vocab_size,
                hidden=llm_hidden,
                layers=llm_layers,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
            ),
            "tie_word_embeddings": False,
        },
    }


def write_tiny_checkpoint(
    out_dir: Path, seed: int = 0, *, llm_prefix: str = LLM_PREFIX, **sizes: int
) -> None:
    """Write a tiny random-weight ColEmbed checkpoint (config, safetensors, tokenizer files).

    It runs the real code path; its outputs mean nothing. `sizes` override `tiny_config`'s
    keyword arguments (image_size, patch_size, vision_hidden, llm_hidden, max_tiles, ...).
    `llm_prefix=LLM_PREFIX_CAUSAL_LM` writes the Eagle2 chat layout, LM head included.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_llama3_tokenizer(out_dir, _SPECIAL_TOKENS)
    with open(out_dir / "tokenizer.json", encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    raw = tiny_config(
        vocab_size,
        bos_token_id=added[LLAMA3_BOS],
        eos_token_id=added[LLAMA3_EOS],
        **sizes,
    )
    write_json(out_dir / "config.json", raw)

    torch.manual_seed(seed)
    model = ColEmbed(raw, "sdpa", img_context_id=added[IMG_CONTEXT_TOKEN], llm_prefix=llm_prefix)
    randomize_(model, seed + 1)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if llm_prefix == LLM_PREFIX_CAUSAL_LM:
        gen = torch.Generator().manual_seed(seed + 2)
        width = raw["llm_config"]["hidden_size"]
        tensors[LM_HEAD_PREFIX + "weight"] = torch.randn(vocab_size, width, generator=gen)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
