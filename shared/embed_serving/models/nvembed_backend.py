"""NV-Embed-v2 behind the service: the official input recipe per request item.

Queries get `Instruct: {task}\\nQuery: ` (default task: NVIDIA's question-answering one),
passages no instruction; `</s>` is appended to every text before tokenising; the instruction's
tokens are attended to but left out of the mean."""

from __future__ import annotations

from pathlib import Path

import torch

from embed_serving.backend import Backend, Prepared
from embed_serving.checkpoint import load_tokenizer, pick_device, pick_dtype, read_config
from embed_serving.models.nvembed import instruction_length, load_nvembed
from embed_serving.request import Item, Kind, ModelCaps

DEFAULT_TASK = "Given a question, retrieve passages that answer the question"


def format_instruction(task: str | None) -> str:
    """The query prefix for a task description. A full `Instruct: ...` string is taken as is;
    an empty task means no instruction at all (symmetric, passage-style encoding)."""
    task = DEFAULT_TASK if task is None else task
    if not task.strip():
        return ""
    if task.startswith("Instruct:"):
        return task
    return f"Instruct: {task}\nQuery: "


class NVEmbedBackend(Backend):
    def __init__(self, checkpoint_dir: Path) -> None:
        self.device = pick_device()
        # NVIDIA runs it in half precision on GPU; bf16 keeps fp32's range for 32k-token sums.
        self.dtype = pick_dtype(self.device, torch.bfloat16)
        raw = read_config(checkpoint_dir)
        self.model = load_nvembed(checkpoint_dir, self.device, self.dtype)
        self.tokenizer = load_tokenizer(checkpoint_dir, padding_side="right")
        text_config = raw["text_config"]
        self.max_positions = int(text_config["max_position_embeddings"])
        self.caps = ModelCaps(
            name="nvidia/NV-Embed-v2",
            model_ids=("nvidia/NV-Embed-v2", "nvidia/nv-embed-v2", "NV-Embed-v2", "nv-embed-v2"),
            supports_instruction=True,
            dimension=int(text_config["hidden_size"]),
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.eos = self.tokenizer.eos_token

    def prepare(self, items: list[Item], kind: Kind, instruction: str | None) -> list[Prepared]:
        prefix = format_instruction(instruction) if kind == "query" else ""
        strings = [prefix + (item.text or "") + self.eos for item in items]
        encoded = self.tokenizer(strings, add_special_tokens=True, truncation=False)["input_ids"]
        pool_from = instruction_length(self.tokenizer, prefix)
        head = 1 + len(self.tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"])
        # START truncation keeps the instruction (and never leaves a row with nothing pooled).
        protected = max(head if prefix else 1, pool_from)
        # The official recipe masks the instruction's own token count, which is more than the
        # row holds before `</s>` when the instruction's last piece merges with the text
        # ("Instruct: Phot" + "osynthesis" is <s> Instruct: Photosynthesis </s>): it then
        # pools nothing and answers NaN. Here the last token, `</s>`, always stays pooled (it
        # attends to the whole row); every row the recipe pools something from is unchanged.
        return [
            Prepared(list(ids), protected=protected, pool_from=min(pool_from, len(ids) - 1))
            for ids in encoded
        ]

    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        ids, mask = self.pad(batch, self.pad_id)
        pool_mask = mask.clone()
        for row, p in enumerate(batch):
            pool_mask[row, : p.pool_from] = 0
        return list(self.model(ids, mask, pool_mask))
