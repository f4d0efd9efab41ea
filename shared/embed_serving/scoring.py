"""Query-passage scoring on the embeddings' device.

Single-vector models use cosine similarity (embeddings arrive L2-normalised, so a dot product).
Multi-vector models (ColEmbed) use ColBERT late interaction, MaxSim: for every query token take
its best-matching passage token, then sum over the query's tokens.

MaxSim is computed in bounded chunks of length-sorted passages. Padding never contributes:
padded passage tokens are masked with -inf before the max (zero padding would win whenever all
real similarities of a query token are negative) and padded query tokens are dropped from the
sum. Everything is accumulated in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Split a length-sorted run of passages once padding would exceed this share of a chunk...
_MAX_PADDING_FRACTION = 0.1
# ...but only when the chunk is big enough for the waste to cost more than another matmul call.
_MIN_SPLIT_TOKENS = 4096


def cosine_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """(Q, d) x (P, d) L2-normalised embeddings -> (Q, P) float32 dot products."""
    if queries.dim() != 2 or passages.dim() != 2:
        raise ValueError(
            f"expected 2-D (n, d) embeddings, got {tuple(queries.shape)} and "
            f"{tuple(passages.shape)}"
        )
    if queries.shape[1] != passages.shape[1]:
        raise ValueError(f"dimension mismatch: {queries.shape[1]} vs {passages.shape[1]}")
    return queries.float() @ passages.float().T


def _check_multi_vectors(kind: str, vectors: Sequence[torch.Tensor]) -> None:
    for i, v in enumerate(vectors):
        if v.dim() != 2:
            raise ValueError(f"{kind}[{i}]: expected (tokens, d), got shape {tuple(v.shape)}")
        if v.shape[0] == 0:
            raise ValueError(f"{kind}[{i}]: has no token vectors")


def _pad(
    vectors: Sequence[torch.Tensor],
    length: int,
    buffer: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack into a float32 (n, length, d) batch plus an (n, length) mask of real tokens.

    With `buffer`, the batch is a view of its first n * length * d elements: reusing one buffer
    for every chunk saves a fresh allocation (and, on CPU, its page faults) per chunk.
    """
    n, dim = len(vectors), vectors[0].shape[1]
    device = buffer.device if buffer is not None else (device or vectors[0].device)
    if buffer is None:
        out = torch.empty((n, length, dim), dtype=torch.float32, device=device)
    else:
        out = buffer[: n * length * dim].view(n, length, dim)
    for row, v in enumerate(vectors):
        out[row, : v.shape[0]] = v  # the copy also upcasts to float32
        if v.shape[0] < length:
            # Padding is masked after the GEMM; zeros just keep stale NaN/inf out of it.
            out[row, v.shape[0] :] = 0
    lengths = torch.tensor([v.shape[0] for v in vectors], device=device)
    mask = torch.arange(length, device=device) < lengths.unsqueeze(1)
    return out, mask


def _passage_chunks(
    lengths: Sequence[int], budget_per_token: int, max_elements: int
) -> list[list[int]]:
    """Group passage indices, shortest first, into chunks whose padded work fits the budget.

    `budget_per_token` is the number of elements one padded passage token costs in the largest
    intermediate (the float32 copy costs d, the similarity block costs query rows); a chunk of
    n passages padded to length L costs n * L * budget_per_token elements.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    real_tokens = 0
    for idx in order:
        length = lengths[idx]  # sorted ascending, so this is the chunk's new padded length
        n = len(current) + 1
        padded = n * length
        over_budget = padded * budget_per_token > max_elements
        wasteful = (
            padded >= _MIN_SPLIT_TOKENS
            and padded - (real_tokens + length) > _MAX_PADDING_FRACTION * padded
        )
        if current and (over_budget or wasteful):
            chunks.append(current)
            current, real_tokens = [], 0
        current.append(idx)
        real_tokens += length
    if current:
        chunks.append(current)
    return chunks


@torch.no_grad()
def maxsim_scores(
    queries: Sequence[torch.Tensor],
    passages: Sequence[torch.Tensor],
    *,
    max_elements: int = 2**26,
    device: torch.device | None = None,
) -> torch.Tensor:
    """ColBERT MaxSim scores between multi-vector queries and passages.

    `queries[i]` is (nq_i, d) and `passages[j]` is (np_j, d), real tokens only. Returns a (Q, P)
    float32 tensor on the inputs' device with score[i, j] = sum over query i's tokens of the max
    over passage j's tokens of their dot product.

    Work is chunked so that no single intermediate exceeds `max_elements` float32 elements
    (256 MiB by default; the padded passage copy and the similarity block are each bounded, so
    the total stays within a few times that). A single query against a single passage is the
    smallest unit and is always computed whole. Not differentiable (runs under no_grad).

    With `device`, the work runs there and the inputs may live elsewhere (host memory): each
    passage chunk is copied over as it is scored, so the device holds one chunk at a time,
    never the request's whole set of vectors.
    """
    if max_elements <= 0:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    _check_multi_vectors("queries", queries)
    _check_multi_vectors("passages", passages)
    tensors = [*queries, *passages]
    if not tensors:
        return torch.zeros((0, 0), dtype=torch.float32)
    home = tensors[0].device
    device = device or home
    dim = tensors[0].shape[1]
    for t in tensors:
        if t.shape[1] != dim:
            raise ValueError(f"all token vectors must have dimension {dim}, got {t.shape[1]}")
        if t.device != home:
            raise ValueError(f"all tensors must be on one device, got {home} and {t.device}")

    scores = torch.zeros((len(queries), len(passages)), dtype=torch.float32, device=device)
    if not queries or not passages:
        return scores

    # Query chunks: as many queries as fit against the longest passage. Queries are short and
    # similar in length, so they are padded once, up front, and reused for every passage chunk
    # (together about the size of the query input itself).
    q_len = max(q.shape[0] for q in queries)
    p_len = max(p.shape[0] for p in passages)
    per_query = q_len * max(p_len, dim)
    q_step = max(1, min(len(queries), max_elements // per_query))
    q_chunks = []
    for start in range(0, len(queries), q_step):
        chunk = queries[start : start + q_step]
        q_pad, q_mask = _pad(chunk, max(q.shape[0] for q in chunk), device=device)
        q_chunks.append((start, q_pad, q_mask))

    # One padded passage token costs `dim` elements in the float32 passage copy and q_step*q_len
    # in the similarity block; the larger of the two bounds the chunk.
    lengths = [p.shape[0] for p in passages]
    chunks = _passage_chunks(lengths, max(dim, q_step * q_len), max_elements)
    chunk_tokens = max(len(c) * max(lengths[i] for i in c) for c in chunks)
    q_rows = max(q_pad.shape[0] * q_pad.shape[1] for _, q_pad, _ in q_chunks)
    p_buffer = torch.empty(chunk_tokens * dim, dtype=torch.float32, device=device)
    sim_buffer = torch.empty(q_rows * chunk_tokens, dtype=torch.float32, device=device)

    for p_idx in chunks:
        longest = max(lengths[i] for i in p_idx)
        padded = any(lengths[i] < longest for i in p_idx)
        p_pad, p_mask = _pad([passages[i] for i in p_idx], longest, p_buffer)
        n_p, p_tokens, _ = p_pad.shape
        p_flat = p_pad.view(n_p * p_tokens, dim)
        dest = torch.tensor(p_idx, device=device)
        for q_start, q_pad, q_mask in q_chunks:
            n_q, q_tokens, _ = q_pad.shape
            # One plain GEMM: (n_q * q_tokens, d) @ (d, n_p * p_tokens).
            sim = sim_buffer[: n_q * q_tokens * n_p * p_tokens].view(n_q * q_tokens, -1)
            torch.mm(q_pad.view(n_q * q_tokens, dim), p_flat.T, out=sim)
            sim4 = sim.view(n_q, q_tokens, n_p, p_tokens)
            if padded:
                sim4.masked_fill_(~p_mask.view(1, 1, n_p, p_tokens), float("-inf"))
            best = sim4.amax(dim=3)  # (n_q, q_tokens, n_p)
            # Zero-padded query rows already max to exactly 0; the mask keeps that explicit.
            best.masked_fill_(~q_mask.unsqueeze(2), 0.0)
            scores[q_start : q_start + n_q].index_copy_(1, dest, best.sum(dim=1))
    return scores


def top_k_indices(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per query, the indices of the `k` best passages, best first (ties: lower index first).

    `k` larger than the number of passages returns them all; NaN scores rank last.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (queries, passages), got shape {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, scores.shape[1])
    values = scores.float()
    values = torch.where(values.isnan(), torch.full_like(values, float("-inf")), values)
    # A stable descending sort keeps equal scores in index order, unlike torch.topk.
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return order.cpu().tolist()
