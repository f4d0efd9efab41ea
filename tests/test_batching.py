"""Micro-batch planning and truncation rules (pure functions, no model)."""

from __future__ import annotations

import random

import pytest

from embed_serving.backend import Prepared, truncate_prepared
from embed_serving.batching import padding_fraction, plan_batches
from embed_serving.errors import RequestError


@pytest.mark.parametrize("seed", range(5))
def test_batches_cover_every_input_once_within_budgets(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([3, 10, 50, 400, 3000]) + rng.randint(0, 9) for _ in range(200)]
    batches = plan_batches(lengths, max_items=16, max_tokens=4096)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * longest <= 4096
    arrival = [list(range(i, min(i + 16, 200))) for i in range(0, 200, 16)]
    # Length sorting wastes far less than arrival-order chunks.
    assert padding_fraction(lengths, batches) < padding_fraction(lengths, arrival) / 2


def test_oversized_input_gets_its_own_batch() -> None:
    assert plan_batches([10, 9000, 10], max_items=8, max_tokens=1000) == [[1], [0, 2]]


def test_truncation_modes() -> None:
    p = Prepared(list(range(20)), protected=3)
    assert truncate_prepared(p, 20, "NONE", "x", "S") is p
    assert truncate_prepared(p, 8, "END", "x", "S").input_ids == list(range(8))
    assert truncate_prepared(p, 8, "START", "x", "S").input_ids == [0, 1, 2, 15, 16, 17, 18, 19]
    with pytest.raises(RequestError, match=r"passages\[4\] has 20 tokens, the limit is 8 \(S\)"):
        truncate_prepared(p, 8, "NONE", "passages[4]", "S")
    with pytest.raises(RequestError, match="needs 3 tokens before any text"):
        truncate_prepared(p, 3, "START", "q", "S")
