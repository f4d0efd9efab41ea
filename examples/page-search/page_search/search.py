"""Search: the query's FDE picks candidate pages from the store (one dot product per page, an
ANN-friendly single vector), then ColBERT MaxSim on the stored multi-vectors ranks them exactly.
`exact_search` scores every page with MaxSim, the reference the two-stage search approximates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .client import Embedding
from .store import SCAN_BATCH, PageRecord, Store


@dataclass(frozen=True)
class Hit:
    file: str
    page: int
    score: float


def maxsim(query: np.ndarray, page: np.ndarray) -> float:
    """Sum over query tokens of the best dot product with any page token, in float32 (what
    the server's `compute_scores` returns)."""
    return float((query @ page.T).max(axis=1).sum(dtype=np.float32))


def rerank(query: np.ndarray, records: list[PageRecord], k: int) -> list[Hit]:
    hits = [Hit(r.key.file, r.key.page, maxsim(query, r.vectors)) for r in records]
    return sorted(hits, key=_order)[:k]


def search(store: Store, query: Embedding, k: int, candidates: int) -> list[Hit]:
    keys = store.nearest(query.fde, max(k, candidates))
    chunks = (store.fetch(keys[i : i + SCAN_BATCH]) for i in range(0, len(keys), SCAN_BATCH))
    return _top(query, chunks, k)


def exact_search(store: Store, query: Embedding, k: int) -> list[Hit]:
    return _top(query, store.scan(), k)


def _top(query: Embedding, chunks: Iterable[list[PageRecord]], k: int) -> list[Hit]:
    best: list[Hit] = []  # bounded: only the current top-k are kept while pages stream by
    for records in chunks:
        best = sorted(best + rerank(query.vectors, records, k), key=_order)[:k]
    return best


def _order(hit: Hit) -> tuple[float, str, int]:
    # Best first; ties in file, page order so that results are reproducible.
    return (-hit.score, hit.file, hit.page)
