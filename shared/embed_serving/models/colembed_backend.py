"""ColEmbed-3B behind the service: text queries, text / image / image+text passages, one
L2-normalised vector per real token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from embed_serving import tiling
from embed_serving.backend import Backend, Prepared
from embed_serving.checkpoint import load_tokenizer, pick_device, pick_dtype
from embed_serving.models.colembed import load_colembed
from embed_serving.request import Item, Kind, ModelCaps


class ColEmbedBackend(Backend):
    def __init__(self, checkpoint_dir: Path) -> None:
        self.device = pick_device()
        self.dtype = pick_dtype(self.device, torch.bfloat16)
        self.tokenizer = load_tokenizer(checkpoint_dir, padding_side="right")
        self.model, self.spec = load_colembed(
            checkpoint_dir, self.device, self.dtype, tokenizer=self.tokenizer
        )
        backbone = self.model.backbone
        self.max_positions = int(backbone.config.max_position_embeddings)
        self.caps = ModelCaps(
            name="nvidia/llama-nemoretriever-colembed-3b-v1",
            model_ids=(
                "nvidia/llama-nemoretriever-colembed-3b-v1",
                "llama-nemoretriever-colembed-3b-v1",
                "nvidia/llama-3.2-nemoretriever-colembed-3b-v1",
            ),
            multi_vector=True,
            supports_images=True,
            dimension=int(backbone.config.hidden_size),
        )
        self._prefix_tokens = {
            kind: len(self.tokenizer(prefix)["input_ids"])
            for kind, prefix in (("query", self.spec.query_prefix),
                                 ("passage", self.spec.passage_prefix))
        }  # fmt: skip

    def prepare(self, items: list[Item], kind: Kind, instruction: str | None) -> list[Prepared]:
        tiles: list[torch.Tensor | None] = []
        texts: list[str] = []
        for item in items:
            if kind == "query":
                tiles.append(None)
                texts.append(self.spec.query_text(item.text or ""))
            elif item.pixel_values is not None:
                pixels = item.pixel_values  # tiled by `tile_image` as the image was decoded
                tiles.append(pixels)
                texts.append(self.spec.passage_text(item.text, int(pixels.shape[0])))
            else:
                tiles.append(None)
                texts.append(self.spec.passage_text(item.text))
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        prepared = []
        for ids, pixels in zip(encoded, tiles, strict=True):
            ids = list(ids)
            protected = self._prefix_tokens[kind]
            if pixels is not None:
                # The whole image block is protected: truncation may only cut text.
                protected = ids.index(self.spec.img_end_id) + 1
            prepared.append(Prepared(ids, protected=protected, pixel_values=pixels))
        return prepared

    def tile_image(self, image: Any) -> torch.Tensor:
        # uint8 until the device: normalising there is the same float32 arithmetic as the
        # reference's ToTensor + Normalize, so the values (and the golden outputs) are unchanged.
        spec = self.spec
        return tiling.image_to_tiles(
            image, spec.image_size, spec.min_tiles, spec.max_tiles, spec.use_thumbnail
        )

    def max_image_tile_bytes(self) -> int:
        # A grid of at most max_tiles tiles, plus the thumbnail when there are several.
        spec = self.spec
        tiles = spec.max_tiles + (1 if spec.use_thumbnail and spec.max_tiles > 1 else 0)
        return tiles * 3 * spec.image_size**2

    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        ids, mask = self.pad(batch, self.spec.pad_token_id)
        tiles = [p.pixel_values for p in batch if p.pixel_values is not None]
        pixels = None
        if tiles:
            uint8 = torch.cat(tiles).to(self.device)
            pixels = tiling.normalize_tiles(uint8, self.spec.image_mean, self.spec.image_std)
            pixels = pixels.to(self.dtype)
        out = self.model(ids, mask, pixels)
        return [out[row, : len(p.input_ids)] for row, p in enumerate(batch)]
