"""Token pooling and MUVERA FDEs equal their reference libraries (1e-5), on the golden colembed
outputs and on random multi-vectors (the references and why they are what they are:
tests/reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import colpali_pool, muvera_reference

from embed_serving import fde, pooling
from embed_serving.errors import RequestError
from embed_serving.request import ModelCaps, parse_embeddings, parse_predict
from embed_serving.settings import Settings


def assert_same_set(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    """Same rows in any order: each row of `got` matches a distinct row of `want`."""
    assert got.shape == want.shape, (got.shape, want.shape)
    dist = torch.cdist(got.double(), want.double(), p=float("inf"))
    match = dist.argmin(dim=1)
    assert len(set(match.tolist())) == len(match), "two pooled vectors matched the same one"
    worst = float(dist.gather(1, match[:, None]).max())
    assert worst <= atol, f"max |diff| {worst} > {atol}"


def golden_vectors(golden: Path) -> dict[str, list[torch.Tensor]]:
    cases = json.loads((golden / "colembed-3b" / "cases.json").read_text())
    return {
        kind: [torch.tensor(c["embeddings"], dtype=torch.float32) for c in cases[kind]]
        for kind in ("queries", "passages")
    }


def random_multivectors(seed: int, lengths: list[int], dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        # Clustered tokens (as real pages have), not isotropic noise.
        centers = torch.randn(max(1, n // 8), dim, generator=g)
        pick = torch.randint(0, centers.shape[0], (n,), generator=g)
        out.append(F.normalize(centers[pick] + 0.3 * torch.randn(n, dim, generator=g), dim=-1))
    return out


@pytest.mark.parametrize("pool_factor", [2, 3, 5])
def test_pooling_equals_colpali_on_golden_passages(golden: Path, pool_factor: int) -> None:
    for vectors in golden_vectors(golden)["passages"]:
        got = pooling.pool(vectors, pool_factor)
        assert got.shape[0] == max(1, vectors.shape[0] // pool_factor)
        assert_same_set(got, colpali_pool(vectors, pool_factor))


@pytest.mark.parametrize("pool_factor", [2, 3, 4])
def test_pooling_equals_colpali_on_random_multivectors(pool_factor: int) -> None:
    for vectors in random_multivectors(pool_factor, [2, 7, 64, 300, 900], 128):
        assert_same_set(pooling.pool(vectors, pool_factor), colpali_pool(vectors, pool_factor))


def test_pooling_edge_cases() -> None:
    one = F.normalize(torch.randn(1, 16), dim=-1)
    assert torch.equal(pooling.pool(one, 3), one)  # one token: nothing to merge
    v = F.normalize(torch.randn(10, 16), dim=-1)
    assert torch.equal(pooling.pool(v, 1), v)
    assert pooling.pool(v, 16).shape == (1, 16)  # n // pool_factor = 0: one cluster
    assert torch.allclose(pooling.pool(v, 16)[0], F.normalize(v.mean(0), dim=-1), atol=1e-6)


PARAMS = [
    fde.FdeParams(),  # fastembed's defaults
    fde.FdeParams(k_sim=3, dim_proj=8, r_reps=4, seed=7),
    fde.FdeParams(k_sim=6, dim_proj=32, r_reps=2, seed=0),  # 64 buckets: many left empty
]


@pytest.mark.parametrize("params", PARAMS)
def test_fde_equals_fastembed_on_golden(golden: Path, params: fde.FdeParams) -> None:
    vectors = golden_vectors(golden)
    for kind, document in (("queries", False), ("passages", True)):
        got = fde.encode(vectors[kind], params, document=document)
        want = muvera_reference(vectors[kind], params, document)
        assert got.shape == (len(vectors[kind]), params.dimensions())
        assert np.abs(got.numpy() - want).max() <= 1e-5


@pytest.mark.parametrize("params", PARAMS)
def test_fde_equals_fastembed_on_random(params: fde.FdeParams) -> None:
    vectors = random_multivectors(1, [1, 3, 40, 500], 96)
    for document in (False, True):
        got = fde.encode(vectors, params, document=document)
        assert np.abs(got.numpy() - muvera_reference(vectors, params, document)).max() <= 1e-5


def test_fde_projection_skipped_at_full_width() -> None:
    # dim_proj == dim: fastembed keeps the bucket centres unprojected.
    vectors = random_multivectors(2, [5, 30], 16)
    params = fde.FdeParams(k_sim=2, dim_proj=16, r_reps=3, seed=5)
    for document in (False, True):
        got = fde.encode(vectors, params, document=document).numpy()
        assert np.abs(got - muvera_reference(vectors, params, document)).max() <= 1e-5


def test_fde_chunks_equal_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = random_multivectors(3, [50, 10, 80, 1], 64)
    whole = fde.encode(vectors, fde.FdeParams(), document=True)
    monkeypatch.setattr(fde, "_CHUNK_ELEMENTS", 64 * 60)  # ~60 tokens a chunk
    assert torch.allclose(fde.encode(vectors, fde.FdeParams(), document=True), whole, atol=1e-6)


@pytest.mark.parametrize("field", [{"pool_factor": 2}, {"fde": True}])
def test_single_vector_models_refuse_reductions(field: dict) -> None:
    caps = ModelCaps(name="nvidia/llama-3.2-nv-embedqa-1b-v2", model_ids=("m",), dimension=2048)
    settings = Settings(max_tokens={"query": 8, "passage": 8}, max_tokens_setting={})
    (name,) = field
    for parse, body in (
        (parse_predict, {"passages": ["text"], **field}),
        (parse_embeddings, {"input": ["text"], "input_type": "passage", **field}),
    ):
        with pytest.raises(RequestError, match=f"`{name}` is not supported by nvidia/"):
            parse(body, caps, settings)
