"""The reference implementations that pooling and FDEs must equal, for tests and benchmarks.

Pooling: colpali-engine's `HierarchicalTokenPooler._pool_single_embedding` (colpali-engine
0.3.18), its calls reproduced verbatim with scipy. The package itself cannot sit in our dev
lock: importing it imports its models (peft, accelerate), and it pulls a PyPI torchvision, which
would change transformers' image-processing paths in the venv and is a CUDA build beside our
CPU torch. FDE: fastembed's own `Muvera` (installed without its dependencies, see
requirements-dev-nodeps.txt: fastembed pins huggingface-hub<2.0, we pin 2.4.0; Muvera needs only
numpy and is constructed without any hub model).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from fastembed.postprocess import Muvera
from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage

from embed_serving import fde


def colpali_pool(embedding: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """colpali-engine 0.3.18 `HierarchicalTokenPooler._pool_single_embedding`, same calls."""
    token_length = embedding.size(0)
    if pool_factor == 1:
        return embedding
    embedding = embedding.to(torch.float32).cpu()
    similarities = torch.mm(embedding, embedding.t())
    distances = 1 - similarities.numpy()
    with warnings.catch_warnings():  # scipy's "looks like a distance matrix" hint
        warnings.simplefilter("ignore", ClusterWarning)
        z = linkage(distances, metric="euclidean", method="ward")
    max_clusters = max(token_length // pool_factor, 1)
    cluster_labels = fcluster(z, t=max_clusters, criterion="maxclust") - 1
    pooled = []
    for cluster_id in range(max_clusters):
        cluster_indices = torch.where(torch.tensor(cluster_labels == cluster_id))
        if cluster_indices[0].numel() > 0:
            mean = embedding[cluster_indices].mean(dim=0)
            pooled.append(F.normalize(mean, p=2, dim=-1))
    return torch.stack(pooled, dim=0)


def muvera_reference(vectors: list[torch.Tensor], p: fde.FdeParams, document: bool) -> np.ndarray:
    muvera = Muvera(vectors[0].shape[1], p.k_sim, p.dim_proj, p.r_reps, p.seed)
    encode = muvera.process_document if document else muvera.process_query
    return np.stack([encode(v.numpy()) for v in vectors])
