"""Hierarchical token pooling of a passage's multi-vector (`pool_factor`).

The algorithm is colpali-engine's `HierarchicalTokenPooler`, so that pooled pages interoperate
with indexes built by it: the token vectors V (n, d) give distances `1 - V V^T` (float32, as it
computes them); each row of that matrix is a point, Ward linkage clusters the points, `fcluster`
cuts the tree at `max(1, n // pool_factor)` clusters, and each cluster becomes the L2-normalised
mean of its token vectors, in cluster-label order.

colpali-engine hands the (n, n) matrix to scipy's `linkage`, which first computes the
Euclidean distances between its rows with `pdist`: an O(n^3) loop on one core, ~1 s for a
1,800-token page. We compute the same distances as one float64 GEMM
(|a - b|^2 = |a|^2 + |b|^2 - 2 a.b) on the model's device (`row_distances`, on the engine
thread: milliseconds on a GPU), then give scipy the condensed distances, so that Ward's
merges (sequential, O(n^2), ~50 ms at 1,800 tokens) and the cluster means run in the prepare
pool (`pool_with_distances`), beside the device, not in its way. float64 keeps the distances
within ~1e-11 of pdist's, so the merges, and the pooled vectors, are the library's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# scipy is imported where it is used: only colembed-3b (multi-vector) ships it, while this
# library is bundled into every package.


def clusters(n: int, pool_factor: int) -> int:
    """How many vectors a passage of `n` tokens keeps (the library's `max_clusters`)."""
    return n if pool_factor <= 1 else max(1, n // pool_factor)


def row_distances(vectors: torch.Tensor, device: torch.device | None = None) -> np.ndarray:
    """Condensed (scipy order) Euclidean distances between the rows of `1 - V V^T`, float64."""
    from scipy.spatial.distance import squareform

    device = device or vectors.device
    v = vectors.to(device, torch.float32)
    # float32 similarities, as colpali-engine computes them; then float64 for the distances.
    d = (1 - v @ v.T).double()
    gram = d @ d.T
    sq = gram.diagonal()
    full = (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0).sqrt_()
    full.fill_diagonal_(0)
    return squareform(full.cpu().numpy(), checks=False)


def pool_with_distances(
    vectors: torch.Tensor, distances: np.ndarray, pool_factor: int
) -> torch.Tensor:
    """The pooled vectors (k, d) float32 of `vectors` (n, d), given `row_distances(vectors)`."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = vectors.shape[0]
    k = clusters(n, pool_factor)
    if k >= n:
        return vectors
    tree = linkage(distances, method="ward")
    labels = torch.from_numpy(fcluster(tree, t=k, criterion="maxclust").astype(np.int64) - 1)
    # fcluster may give fewer than k clusters (ties): the library skips empty labels too.
    used = int(labels.max()) + 1
    v = vectors.float()
    sums = torch.zeros((used, v.shape[1]), dtype=torch.float32).index_add_(0, labels, v)
    counts = torch.bincount(labels, minlength=used)
    keep = counts > 0
    means = sums[keep] / counts[keep].unsqueeze(1).float()
    return F.normalize(means, p=2, dim=-1)


def pool(vectors: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """Both steps on the vectors' own device (tests, benchmarks)."""
    if clusters(vectors.shape[0], pool_factor) >= vectors.shape[0]:
        return vectors
    return pool_with_distances(vectors.cpu(), row_distances(vectors), pool_factor)
