"""The contract between the generic service and one model: turn items into token ids, and run
padded micro-batches through the network."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from embed_serving.errors import RequestError
from embed_serving.request import Item, Kind, ModelCaps


@dataclass
class Prepared:
    """One tokenised input, before truncation."""

    input_ids: list[int]
    # Leading tokens that truncation must keep (BOS, prefix / instruction, an image block):
    # cutting them would change what the model is asked, not just shorten the text.
    protected: int = 1
    # NV-Embed: the instruction's tokens are attended to but not pooled.
    pool_from: int = 0
    # ColEmbed: the tiles of this input's image, uint8 (n_tiles, 3, S, S), normalised on the
    # device (a quarter of float32's host memory while queued).
    pixel_values: torch.Tensor | None = None


def truncate_prepared(p: Prepared, limit: int, mode: str, label: str, setting: str) -> Prepared:
    """Apply NIM's `truncate` to one input whose token count may exceed `limit`.

    END keeps the first `limit` tokens (the official models' own truncation: a cut NV-Embed
    text loses its EOS); START keeps the protected head and the last tokens of the text; NONE
    refuses the input with a 400 naming it and the limit.
    """
    n = len(p.input_ids)
    if n <= limit:
        return p
    if mode == "NONE":
        raise RequestError(
            f"{label} has {n} tokens, the limit is {limit} ({setting}); "
            "shorten it or send `truncate: END` or `START`",
            param=label,
        )
    if p.protected >= limit:
        raise RequestError(
            f"{label} needs {p.protected} tokens before any text (prefix/instruction/image), "
            f"the limit is {limit} ({setting})",
            param=label,
        )
    if mode == "END":
        ids = p.input_ids[:limit]
    else:
        ids = p.input_ids[: p.protected] + p.input_ids[n - (limit - p.protected) :]
    return Prepared(ids, p.protected, p.pool_from, p.pixel_values)


class Backend(ABC):
    caps: ModelCaps
    device: torch.device
    dtype: torch.dtype
    # Positions the checkpoint supports (config's max_position_embeddings).
    max_positions: int

    @abstractmethod
    def prepare(self, items: list[Item], kind: Kind, instruction: str | None) -> list[Prepared]:
        """Token ids for each item, with the model's prefix / instruction, untruncated."""

    def tile_image(self, image: Any) -> torch.Tensor:
        """The tiles of one decoded RGB image (PIL), in the form `prepare` expects in
        `Item.pixel_values`. Called per image in a worker thread, right after decoding, so only
        tiles outlive the bitmap."""
        raise NotImplementedError(f"{type(self).__name__} does not take images")

    def max_image_tile_bytes(self) -> int:
        """Upper bound of `tile_image(...).nbytes` for any image (memory budgeting)."""
        raise NotImplementedError(f"{type(self).__name__} does not take images")

    @abstractmethod
    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        """Embeddings of one micro-batch in batch order: (d,) per input for single-vector
        models, (n_tokens, d) for multi-vector ones; L2-normalised float32."""

    def pad(self, batch: list[Prepared], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask on the model's device."""
        longest = max(len(p.input_ids) for p in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[row, : len(p.input_ids)] = 1
        return ids.to(self.device), mask.to(self.device)
