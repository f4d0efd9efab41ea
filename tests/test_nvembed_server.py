"""nv-embed-v2 end to end through its real Truss server: golden conformance (queries with the
default instruction, passages without), truncation, Triton aliases, instructions, bad input."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from conftest import assert_close

PACKAGE = "nv-embed-v2"
TASK = "Given a question, retrieve passages that answer the question"


def group(cases: dict, kind: str, max_length: int) -> dict:
    (g,) = [g for g in cases["groups"] if g["kind"] == kind and g["max_length"] == max_length]
    return g


@pytest.mark.parametrize("max_length", [512, 48])
def test_golden_predict(cases, server, server_48, max_length) -> None:
    srv = server if max_length == 512 else server_48
    q, p = group(cases, "query", max_length), group(cases, "passage", max_length)
    assert q["instruction"] == f"Instruct: {TASK}\nQuery: "
    r = srv.predict({"queries": q["texts"], "passages": p["texts"], "compute_scores": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert_close(out["query_embeddings"], q["embeddings"], cases["atol"])
    assert_close(out["passage_embeddings"], p["embeddings"], cases["atol"])
    want = np.asarray(q["embeddings"]) @ np.asarray(p["embeddings"]).T
    assert_close(out["scores"], want, 1e-4)
    tokens = sum(q["token_counts"]) + sum(p["token_counts"])
    assert out["usage"]["prompt_tokens"] == tokens


@pytest.mark.parametrize("max_length", [512, 48])
def test_golden_embeddings_route(cases, server, server_48, max_length) -> None:
    srv = server if max_length == 512 else server_48
    for kind in ("query", "passage"):
        g = group(cases, kind, max_length)
        r = srv.embeddings({"input": g["texts"], "input_type": kind, "truncate": "END"})
        assert r.status_code == 200, r.text
        assert_close([d["embedding"] for d in r.json()["data"]], g["embeddings"], cases["atol"])


def test_instruction_forms_and_aliases(cases, server) -> None:
    q, p = group(cases, "query", 512), group(cases, "passage", 512)
    for instruction in (TASK, f"Instruct: {TASK}\nQuery: "):
        out = server.predict({"queries": q["texts"], "instruction": instruction}).json()
        assert_close(out["query_embeddings"], q["embeddings"], cases["atol"])
    other = server.predict(
        {"queries": q["texts"][:1], "instruction": "Retrieve semantically similar text"}
    ).json()
    assert not np.allclose(other["query_embeddings"][0], q["embeddings"][0], atol=1e-3)
    # Triton-era aliases: one `query` and `documents`.
    out = server.predict({"query": q["texts"][0], "documents": p["texts"]}).json()
    assert_close(out["query_embeddings"], q["embeddings"][:1], cases["atol"])
    assert_close(out["passage_embeddings"], p["embeddings"], cases["atol"])


def test_batched_equals_one_at_a_time(cases, server) -> None:
    p = group(cases, "passage", 512)
    together = server.predict({"passages": p["texts"], "batch_size": 4}).json()
    for i, text in enumerate(p["texts"]):
        one = server.predict({"passages": [text]}).json()["passage_embeddings"]
        assert_close(one, [together["passage_embeddings"][i]], 1e-5)


def test_openai_client(cases, server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-locally")
    q = group(cases, "query", 512)
    resp = client.embeddings.create(
        model="nvidia/NV-Embed-v2", input=q["texts"], encoding_format="float",
        extra_body={"input_type": "query"},
    )  # fmt: skip
    assert_close([d.embedding for d in resp.data], q["embeddings"], cases["atol"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"queries": ["a"], "instruction": 5}, ["instruction", "string"]),
        ({"queries": ["a"], "instruction": ["x"]}, ["instruction", "string"]),
        ({"queries": ["a"], "dimensions": 16}, ["dimensions", "not supported"]),
        ({"passages": [{"type": "image", "url": "http://x/y.png"}]}, ["passages[0]", "image"]),
        ({"queries": ["x " * 40000], "truncate": "NONE"}, ["queries[0]", "MAX_INPUT_TOKENS"]),
        ({"documents": "text"}, ["documents", "list"]),
    ],
)
def test_bad_input(server, cases, body, words) -> None:
    r = server.predict(body)
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"]
    q = group(cases, "query", 512)
    ok = server.predict({"queries": q["texts"][:1]}).json()
    assert_close(ok["query_embeddings"], q["embeddings"][:1], cases["atol"])


def test_instruction_merging_into_the_text_is_not_an_error(server) -> None:
    # The tiny tokenizer makes "Instruct: Phot" + "osynthesis" into <s> Instruct: Photosynthesis
    # </s>: the instruction alone counts 4 tokens, the whole row 4. NVIDIA's recipe would pool
    # nothing (NaN); the row's </s> is pooled instead, and the answer depends on the text.
    body = {"queries": ["osynthesis"], "instruction": "Instruct: Phot"}
    r = server.predict(body)
    assert r.status_code == 200, r.text
    vector = np.asarray(r.json()["query_embeddings"][0])
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-3
    other = server.predict({**body, "queries": ["osynthesis of light"]})
    assert other.status_code == 200, other.text
    assert not np.allclose(vector, other.json()["query_embeddings"][0], atol=1e-3)
    for route_body in ({**body, "truncate": "START"}, {**body, "queries": ["osynthesis"] * 3}):
        assert server.predict(route_body).status_code == 200
