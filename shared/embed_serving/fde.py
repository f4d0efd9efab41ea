"""MUVERA fixed-dimensional encodings (FDE) of multi-vectors: one vector per input, for any ANN
index, reranked afterwards with exact MaxSim.

The encoding is fastembed's `Muvera` (same parameters, same seed, same random matrices drawn
from `numpy.random.default_rng(seed)` in the same order), so a client can encode queries with
fastembed and passages here, or the other way round. For each of `r_reps` repetitions, `k_sim`
SimHash hyperplanes put each token in one of 2^k_sim buckets; a bucket holds the sum of its
tokens (queries) or their mean (passages, whose empty buckets take the first token of the
nearest non-empty bucket by Hamming distance); each bucket is projected to `dim_proj`
dimensions by a random +-1 matrix scaled by 1/sqrt(dim_proj), and everything is concatenated:
`r_reps * 2^k_sim * dim_proj` values.

Unlike fastembed (a Python loop over tokens, per input), this runs batched on the device: the
projection is linear, so tokens are projected first (one GEMM) and the projected tokens summed
per bucket with one scatter-add. float64 throughout, as fastembed computes: a hyperplane's
sign decided in float32 would put a token in another bucket about once per page.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Fixed limits (documented in the README): they bound the random matrices and intermediates
# whatever a request asks; MAX_FDE_DIMENSIONS bounds the output size on top.
MAX_K_SIM = 10
MAX_DIM_PROJ = 128
MAX_R_REPS = 64
# Work per chunk of tokens: tokens x max(d, r_reps * dim_proj) float64 elements.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class FdeParams:
    """fastembed's `Muvera` defaults."""

    k_sim: int = 5
    dim_proj: int = 16
    r_reps: int = 20
    seed: int = 42

    def dimensions(self) -> int:
        return self.r_reps * (1 << self.k_sim) * self.dim_proj


class _Matrices:
    """fastembed's random matrices for one (dim, params), on one device, float64."""

    def __init__(self, dim: int, p: FdeParams, device: torch.device) -> None:
        rng = np.random.default_rng(p.seed)
        simhash = [rng.normal(size=(dim, p.k_sim)) for _ in range(p.r_reps)]
        # (dim, r_reps * k_sim): one GEMM gives every repetition's hyperplane signs.
        self.simhash = torch.from_numpy(np.concatenate(simhash, axis=1)).to(device)
        self.project = None
        if p.dim_proj < dim:
            proj = rng.choice([-1, 1], size=(p.r_reps, dim, p.dim_proj))
            # (dim, r_reps * dim_proj), the 1/sqrt(dim_proj) scale folded in.
            flat = np.transpose(proj, (1, 0, 2)).reshape(dim, p.r_reps * p.dim_proj)
            scaled = flat.astype(np.float64) * (1 / np.sqrt(p.dim_proj))
            self.project = torch.from_numpy(scaled).to(device)
        buckets = torch.arange(1 << p.k_sim, device=device)
        xor = buckets[:, None] ^ buckets[None, :]
        # (2^k, 2^k) Hamming distances between bucket ids: popcounts of their XOR.
        self.hamming = sum((xor >> b) & 1 for b in range(p.k_sim))
        self.bits = (1 << torch.arange(p.k_sim, device=device)).to(torch.float64)


_cache: OrderedDict[tuple, _Matrices] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 4


def _matrices(dim: int, p: FdeParams, device: torch.device) -> _Matrices:
    key = (dim, p, str(device))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    m = _Matrices(dim, p, device)
    with _cache_lock:
        _cache[key] = m
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return m


def encode(
    vectors: Sequence[torch.Tensor],
    params: FdeParams,
    *,
    document: bool,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(len(vectors), params.dimensions()) float32 FDEs on the CPU: `process_document` of each
    multi-vector when `document`, else `process_query`. Inputs in chunks of bounded size."""
    if not vectors:
        return torch.zeros((0, params.dimensions()), dtype=torch.float32)
    device = device or vectors[0].device
    dim = vectors[0].shape[1]
    m = _matrices(dim, params, device)
    width = max(dim, params.r_reps * max(params.dim_proj, params.k_sim))
    budget = max(1, _CHUNK_ELEMENTS // width)
    out: list[torch.Tensor] = []
    start = 0
    while start < len(vectors):
        end, tokens = start, 0
        while end < len(vectors) and (end == start or tokens + vectors[end].shape[0] <= budget):
            tokens += vectors[end].shape[0]
            end += 1
        out.append(_encode_chunk(vectors[start:end], params, m, document, device).cpu())
        start = end
    return torch.cat(out).float()


def _encode_chunk(
    vectors: Sequence[torch.Tensor],
    p: FdeParams,
    m: _Matrices,
    document: bool,
    device: torch.device,
) -> torch.Tensor:
    n_items, reps, nb = len(vectors), p.r_reps, 1 << p.k_sim
    lengths = torch.tensor([v.shape[0] for v in vectors], device=device)
    v = torch.cat([x.to(device) for x in vectors]).double()  # (T, dim)
    total = v.shape[0]
    item = torch.repeat_interleave(torch.arange(n_items, device=device), lengths)  # (T,)
    signs = (v @ m.simhash).view(total, reps, p.k_sim) > 0
    bucket = (signs.double() @ m.bits).long()  # (T, reps): the bucket id per repetition
    projected = v @ m.project if m.project is not None else v.repeat(1, reps)
    width = projected.shape[1] // reps
    projected = projected.view(total, reps, width)
    # Flat slot of (item, rep, bucket).
    rep_ids = torch.arange(reps, device=device)
    slot = (item[:, None] * reps + rep_ids[None, :]) * nb + bucket  # (T, reps)
    slots = n_items * reps * nb
    sums = torch.zeros((slots, width), dtype=torch.float64, device=device)
    sums.index_add_(0, slot.reshape(-1), projected.reshape(-1, width))
    if not document:
        return sums.view(n_items, -1)
    counts = torch.bincount(slot.reshape(-1), minlength=slots)
    empty = counts == 0
    centers = sums / counts.clamp(min=1).unsqueeze(1).double()
    holes = empty.nonzero().squeeze(1)
    if holes.numel():
        # Each bucket's first token (lowest index): what fills the empty buckets near it.
        token = torch.arange(total, device=device)[:, None].expand(total, reps).reshape(-1)
        first = torch.full((slots,), total, dtype=torch.long, device=device)
        first.scatter_reduce_(0, slot.reshape(-1), token, reduce="amin")
        empty2 = empty.view(n_items * reps, nb)
        fill = torch.empty((holes.numel(), width), dtype=torch.float64, device=device)
        step = max(1, _CHUNK_ELEMENTS // nb)
        for start in range(0, holes.numel(), step):
            hole = holes[start : start + step]
            group, own = hole // nb, hole % nb
            # Nearest non-empty bucket of the same (input, repetition) by Hamming distance,
            # ties to the lowest id (np.argmin's first minimum).
            masked = torch.where(empty2[group], nb + 1, m.hamming[own])
            nearest = group * nb + masked.argmin(dim=1)
            fill[start : start + step] = projected[first[nearest], group % reps]
        centers[holes] = fill
    return centers.view(n_items, -1)
