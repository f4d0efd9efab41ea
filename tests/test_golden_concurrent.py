"""Golden conformance under cross-request batching: every golden input of the three packages
goes through the real server as its own request, many at once and in shuffled order, on both
routes, so the engine mixes them into shared micro-batches with each other's padding. Every
answer must equal NVIDIA's reference (the fixture's atol) and the same input sent alone
(1e-5), and land in the request that asked for it. colembed's fixture (text and page-image
passages, MaxSim scores) is also checked whole, as one request."""

from __future__ import annotations

import base64
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import assert_close

ROUNDS = 2
CONCURRENCY = 16


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _embed_text(url: str, route: str, kind: str, text: str) -> tuple[list[float], int]:
    if route == "predict":
        field = "queries" if kind == "query" else "passages"
        out = _post(url, "/v1/models/model:predict", {field: [text], "truncate": "END"})
        return out[f"{kind}_embeddings"][0], out["usage"]["prompt_tokens"]
    body = {"input": [text], "input_type": kind, "truncate": "END"}
    out = _post(url, "/v1/embeddings", body)
    assert [d["index"] for d in out["data"]] == [0]
    return out["data"][0]["embedding"], out["usage"]["prompt_tokens"]


def _concurrently(jobs: list[tuple[Any, ...]], fn) -> list[Any]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


@pytest.mark.parametrize("package", ["embedqa-1b-v2", "nv-embed-v2"])
def test_text_golden_spread_over_concurrent_requests(golden: Path, start_server, package) -> None:
    cases = json.loads((golden / package / "cases.json").read_text())
    checkpoint = golden / package / "checkpoint"
    servers = {
        512: start_server(package, checkpoint),
        48: start_server(package, checkpoint, MAX_INPUT_TOKENS="48"),
    }
    # (max_length, kind, text, golden vector, golden token count)
    inputs = [
        (g["max_length"], g["kind"], text, vector, count)
        for g in cases["groups"]
        for text, vector, count in zip(g["texts"], g["embeddings"], g["token_counts"], strict=True)
    ]
    alone = {
        (n, kind, text): _embed_text(servers[n].url, "predict", kind, text)
        for n, kind, text, _, _ in inputs
    }
    rng = random.Random(0)
    jobs = [
        (n, kind, text, vector, count, route)
        for _ in range(ROUNDS)
        for n, kind, text, vector, count in inputs
        for route in ("predict", "embeddings")
    ]
    rng.shuffle(jobs)
    results = _concurrently(
        [(servers[n].url, route, kind, text) for n, kind, text, _, _, route in jobs], _embed_text
    )
    for (n, kind, text, vector, count, _), (got, tokens) in zip(jobs, results, strict=True):
        assert tokens == count
        assert_close(got, vector, cases["atol"])
        assert_close(got, alone[(n, kind, text)][0], 1e-5)


def _colembed_item(golden: Path, passage: dict) -> Any:
    if passage["image"] is None:
        return passage["text"]
    content = base64.b64encode((golden / "colembed-3b" / passage["image"]["file"]).read_bytes())
    item = {"type": "image", "content": content.decode("ascii")}
    if passage["text"] is not None:
        item["text"] = passage["text"]
    return item


def _b64_multivectors(out: dict, kind: str) -> list[np.ndarray]:
    return [
        np.frombuffer(base64.b64decode(b), dtype="<f4").reshape(shape)
        for b, shape in zip(out[f"{kind}_embeddings"], out[f"{kind}_embedding_shapes"], strict=True)
    ]


def test_colembed_golden_whole_and_spread_over_concurrent_requests(golden: Path, start_server):
    cases = json.loads((golden / "colembed-3b" / "cases.json").read_text())
    settings = {k: str(v) for k, v in cases["settings"].items()}
    server = start_server("colembed-3b", golden / "colembed-3b" / "checkpoint", **settings)
    queries = [q["text"] for q in cases["queries"]]
    passages = [_colembed_item(golden, p) for p in cases["passages"]]

    # Whole: one request, scores included.
    body = {"queries": queries, "passages": passages, "compute_scores": True,
            "encoding_format": "base64"}  # fmt: skip
    out = _post(server.url, "/v1/models/model:predict", body)
    for got, want in zip(_b64_multivectors(out, "query"), cases["queries"], strict=True):
        assert_close(got, want["embeddings"], cases["atol"])
    for got, want in zip(_b64_multivectors(out, "passage"), cases["passages"], strict=True):
        assert_close(got, want["embeddings"], cases["atol"])
    assert_close(out["scores"], cases["scores"], cases["score_atol"])
    tokens = sum(len(x["token_ids"]) for x in cases["queries"] + cases["passages"])
    assert out["usage"]["prompt_tokens"] == tokens

    # Spread: every input its own request, all at once, shuffled, twice.
    def one(kind: str, index: int) -> np.ndarray:
        field, item = ("queries", queries[index]) if kind == "query" else (
            "passages", passages[index])  # fmt: skip
        out = _post(server.url, "/v1/models/model:predict",
                    {field: [item], "encoding_format": "base64"})  # fmt: skip
        (vectors,) = _b64_multivectors(out, kind)
        return vectors

    keys = [("query", i) for i in range(len(queries))] + [
        ("passage", i) for i in range(len(passages))
    ]
    alone = {key: one(*key) for key in keys}
    jobs = keys * ROUNDS
    random.Random(1).shuffle(jobs)
    for (kind, i), got in zip(jobs, _concurrently(jobs, one), strict=True):
        want = (cases["queries"] if kind == "query" else cases["passages"])[i]["embeddings"]
        assert_close(got, want, cases["atol"])
        assert_close(got, alone[(kind, i)], 1e-5)
