"""`pool_factor` and `fde` through colembed's real Truss server (golden checkpoint), on both
routes: pooled passages are colpali-engine's pooling of the unpooled ones, FDEs are fastembed's
Muvera of the vectors returned, scores and top_k use the pooled vectors, encodings and binary
types carry the reduced shapes, and bad values are 400s naming the field."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import colpali_pool, muvera_reference
from test_reduce import assert_same_set

from embed_serving import fde

PACKAGE = "colembed-3b"


@pytest.fixture(scope="module")
def body(golden: Path) -> dict:
    pages = sorted((golden / PACKAGE / "images").glob("*.png"))
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in pages]
    images = [{"type": "image", "content": c} for c in encoded]
    return {
        "queries": ["revenue by region", "what does the diagram show?"],
        "passages": [*images, "Quarterly revenue grew twelve percent in every region."],
    }


@pytest.fixture(scope="module")
def full(server, body: dict) -> dict:
    r = server.predict(body)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def vectors(out: list) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float32) for v in out]


@pytest.mark.parametrize("pool_factor", [2, 3])
def test_predict_pools_passages_not_queries(server, body, full, pool_factor) -> None:
    r = server.predict({**body, "pool_factor": pool_factor, "compute_scores": True, "top_k": 2})
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    assert out["query_embeddings"] == full["query_embeddings"]  # queries are never pooled
    pooled = vectors(out["passage_embeddings"])
    for got, unpooled in zip(pooled, vectors(full["passage_embeddings"]), strict=True):
        assert got.shape[0] == max(1, unpooled.shape[0] // pool_factor)
        assert_same_set(got, colpali_pool(unpooled, pool_factor))
    # Scores and top_k are MaxSim over the pooled vectors.
    queries = vectors(out["query_embeddings"])
    want = np.array([[float((q @ p.T).max(1).values.sum()) for p in pooled] for q in queries])
    assert np.allclose(out["scores"], want, atol=1e-3)
    assert out["top_k"] == [list(np.argsort(-row, kind="stable")[:2]) for row in want]
    assert out["usage"] == full["usage"]  # tokens embedded, whatever is kept


def test_embeddings_route_pools_with_shapes_in_base64_and_binary(server, body, full) -> None:
    inputs = [f"data:image/png;base64,{p['content']}" for p in body["passages"][:-1]]
    r = server.embeddings(
        {"input": inputs, "input_type": "passage", "pool_factor": 3, "encoding_format": "base64"}
    )
    assert r.status_code == 200, r.text[:500]
    pages = full["passage_embeddings"][:-1]
    for item, unpooled in zip(r.json()["data"], pages, strict=True):
        shape = item["shape"]
        got = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").reshape(shape)
        assert_same_set(torch.from_numpy(got.copy()), colpali_pool(torch.tensor(unpooled), 3))
    packed = server.predict(
        {"passages": body["passages"], "pool_factor": 3, "embedding_type": "ubinary",
         "encoding_format": "base64"}
    ).json()  # fmt: skip
    shapes = packed["passage_embedding_shapes"]
    for shape, unpooled in zip(shapes, full["passage_embeddings"], strict=True):
        assert shape == [len(unpooled) // 3, len(unpooled[0]) // 8]  # one bit per dimension


def test_pool_factor_setting_is_the_default(start_server, golden, body) -> None:
    server = start_server(PACKAGE, golden / PACKAGE / "checkpoint", POOL_FACTOR="2")
    text = body["passages"][-1]
    default = server.predict({"passages": [text]}).json()["passage_embeddings"][0]
    explicit = server.predict({"passages": [text], "pool_factor": 2}).json()
    assert default == explicit["passage_embeddings"][0]
    unpooled = server.predict({"passages": [text], "pool_factor": 1}).json()
    assert len(default) == len(unpooled["passage_embeddings"][0]) // 2


def test_predict_fde_equals_fastembed(server, body, full) -> None:
    params = {"k_sim": 4, "dim_proj": 8, "r_reps": 3, "seed": 11}
    r = server.predict({**body, "fde": params})
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    p = fde.FdeParams(**params)
    for kind, document in (("query", False), ("passage", True)):
        want = muvera_reference(vectors(full[f"{kind}_embeddings"]), p, document)
        assert np.asarray(out[f"{kind}_fde"]).shape == (len(want), 3 * 16 * 8)
        assert np.abs(np.asarray(out[f"{kind}_fde"]) - want).max() <= 1e-5
    assert out["passage_embeddings"] == full["passage_embeddings"]


def test_fde_only_of_pooled_passages_on_both_routes(server, body) -> None:
    r = server.predict({**body, "fde": True, "pool_factor": 2, "return_embeddings": False})
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    assert set(out) == {"model", "query_fde", "passage_fde", "usage"}
    pooled = server.predict({"passages": body["passages"], "pool_factor": 2}).json()
    want = muvera_reference(vectors(pooled["passage_embeddings"]), fde.FdeParams(), True)
    assert np.abs(np.asarray(out["passage_fde"]) - want).max() <= 1e-5
    # /v1/embeddings: `fde` beside each item's `embedding`, or alone; base64 and ubinary apply.
    emb = server.embeddings({"input": ["revenue by region"], "input_type": "query", "fde": True})
    item = emb.json()["data"][0]
    assert np.allclose(item["fde"], out["query_fde"][0], atol=1e-6) and "embedding" in item
    only = server.embeddings(
        {"input": ["revenue by region"], "input_type": "query", "fde": True,
         "return_embeddings": False, "encoding_format": "base64", "embedding_type": "ubinary"}
    ).json()["data"][0]  # fmt: skip
    assert set(only) == {"object", "index", "fde"}
    bits = np.frombuffer(base64.b64decode(only["fde"]), np.uint8)
    assert np.array_equal(bits, np.packbits(np.asarray(out["query_fde"][0]) > 0))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"pool_factor": 0}, ["pool_factor", "positive integer"]),
        ({"pool_factor": -2}, ["pool_factor"]),
        ({"pool_factor": 2.5}, ["pool_factor"]),
        ({"pool_factor": True}, ["pool_factor"]),
        ({"pool_factor": "3"}, ["pool_factor"]),
        ({"pool_factor": 17}, ["pool_factor", "16", "MAX_POOL_FACTOR"]),
        ({"fde": "yes"}, ["fde"]),
        ({"fde": {"k_sim": 0}}, ["fde.k_sim"]),
        ({"fde": {"dim_proj": 65}}, ["fde.dim_proj", "64"]),
        ({"fde": {"r_reps": 65}}, ["fde.r_reps", "64"]),
        ({"fde": {"seed": -1}}, ["fde.seed"]),
        ({"fde": {"bits": 3}}, ["fde", "bits"]),
        ({"fde": {"k_sim": 10, "r_reps": 64, "dim_proj": 8}}, ["MAX_FDE_DIMENSIONS"]),
    ],
)
def test_bad_values_name_the_field(server, extra, words) -> None:
    for r in (
        server.predict({"passages": ["some text"], **extra}),
        server.embeddings({"input": ["some text"], "input_type": "passage", **extra}),
    ):
        assert r.status_code == 400, r.text[:500]
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        for word in words:
            assert word in message, message
    assert server.predict({"passages": ["still serving"]}).status_code == 200


def test_return_nothing_is_refused(server) -> None:
    r = server.embeddings({"input": ["x"], "input_type": "query", "return_embeddings": False})
    assert r.status_code == 400 and "fde" in r.text
