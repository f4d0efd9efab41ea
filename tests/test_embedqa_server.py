"""embedqa-1b-v2 end to end through its real Truss server: golden conformance on both routes,
order, batching, truncation, Matryoshka, base64, usage, and the `openai` client."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import assert_close

PACKAGE = "embedqa-1b-v2"


def groups(cases: dict, max_length: int) -> list[dict]:
    return [g for g in cases["groups"] if g["max_length"] == max_length]


@pytest.mark.parametrize("max_length", [512, 48])
def test_golden_predict(cases, server, server_48, max_length) -> None:
    srv = server if max_length == 512 else server_48
    by_kind = {g["kind"]: g for g in groups(cases, max_length)}
    body = {"queries": by_kind["query"]["texts"], "passages": by_kind["passage"]["texts"]}
    r = srv.predict(body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert_close(out["query_embeddings"], by_kind["query"]["embeddings"], cases["atol"])
    assert_close(out["passage_embeddings"], by_kind["passage"]["embeddings"], cases["atol"])
    tokens = sum(by_kind["query"]["token_counts"]) + sum(by_kind["passage"]["token_counts"])
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize("max_length", [512, 48])
def test_golden_embeddings_route(cases, server, server_48, max_length) -> None:
    srv = server if max_length == 512 else server_48
    for g in groups(cases, max_length):
        # /v1/embeddings defaults to truncate NONE as NIM does: the cut group must say END.
        body = {"input": g["texts"], "input_type": g["kind"], "truncate": "END"}
        r = srv.embeddings(body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [d["index"] for d in out["data"]] == list(range(len(g["texts"])))
        assert_close([d["embedding"] for d in out["data"]], g["embeddings"], cases["atol"])
        assert out["usage"]["prompt_tokens"] == sum(g["token_counts"])


def test_truncate_none_refuses_what_end_cuts(cases, server_48) -> None:
    g = groups(cases, 48)[0]
    long_index = g["token_counts"].index(48)
    r = server_48.embeddings({"input": g["texts"], "input_type": g["kind"]})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert f"input[{long_index}]" in msg and "48" in msg and "MAX_INPUT_TOKENS" in msg


def test_truncate_start_keeps_the_end(server_48) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    tail = " ".join(f"w{i}" for i in range(120, 200))
    start = server_48.predict({"queries": [words], "truncate": "START"}).json()
    end = server_48.predict({"queries": [words], "truncate": "END"}).json()
    assert start["usage"]["prompt_tokens"] == end["usage"]["prompt_tokens"] == 48
    assert not np.allclose(start["query_embeddings"][0], end["query_embeddings"][0], atol=1e-3)
    # START keeps BOS + "query:" and the text's last tokens: the embedding of a long text cut
    # at the start differs from its head, and shortening its head changes nothing.
    start_tail = server_48.predict({"queries": [tail], "truncate": "START"}).json()
    assert start_tail["usage"]["prompt_tokens"] <= 48
    if start_tail["usage"]["prompt_tokens"] == 48:
        assert_close(start_tail["query_embeddings"], start["query_embeddings"], 1e-5)


def test_batched_equals_one_at_a_time_and_order(cases, server) -> None:
    g = groups(cases, 512)[1]
    texts = g["texts"]
    together = server.predict({"passages": texts, "batch_size": 2}).json()["passage_embeddings"]
    for i, text in enumerate(texts):
        single = server.predict({"passages": [text]}).json()["passage_embeddings"][0]
        assert_close([single], [together[i]], 1e-5)
    # A shuffled request gives the same vectors in its own order.
    order = [3, 0, 5, 1, 4, 2]
    shuffled = server.predict({"passages": [texts[i] for i in order]}).json()
    assert_close(shuffled["passage_embeddings"], [together[i] for i in order], 1e-5)


def test_scores_and_top_k(cases, server) -> None:
    q, p = groups(cases, 512)[0], groups(cases, 512)[1]
    r = server.predict(
        {"queries": q["texts"][:2], "passages": p["texts"], "compute_scores": True, "top_k": 3}
    ).json()
    want = np.asarray(q["embeddings"][:2]) @ np.asarray(p["embeddings"]).T
    assert_close(r["scores"], want.tolist(), 1e-4)
    assert r["top_k"] == [list(np.argsort(-row, kind="stable")[:3]) for row in want]
    only = server.predict(
        {"queries": q["texts"][:2], "passages": p["texts"], "compute_scores": True,
         "return_embeddings": False}
    ).json()  # fmt: skip
    assert "query_embeddings" not in only and "passage_embeddings" not in only
    assert_close(only["scores"], r["scores"], 1e-6)


def test_dimensions_and_base64(cases, server) -> None:
    g = groups(cases, 512)[0]
    full = np.asarray(g["embeddings"], dtype=np.float32)
    r = server.embeddings(
        {"input": g["texts"], "input_type": "query", "encoding_format": "base64", "dimensions": 16}
    )
    assert r.status_code == 200, r.text
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    assert_close(got, full.tolist(), 1e-4)
    bad = server.embeddings({"input": "x", "dimensions": 384})
    assert bad.status_code == 400 and "16" in bad.json()["error"]["message"]


def test_openai_client(cases, server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-locally")
    g = groups(cases, 512)[1]
    for model in ("nvidia/llama-3.2-nv-embedqa-1b-v2", "nvidia/llama-nemotron-embed-1b-v2"):
        resp = client.embeddings.create(
            model=model, input=g["texts"], extra_body={"input_type": "passage"}
        )
        assert resp.model == model
        assert_close([d.embedding for d in resp.data], g["embeddings"], cases["atol"])
        assert resp.usage.prompt_tokens == sum(g["token_counts"])
    # The openai client asks for base64 by default when numpy is present; test both ways.
    resp = client.embeddings.create(
        model="nvidia/llama-3.2-nv-embedqa-1b-v2", input=g["texts"][0],
        encoding_format="base64", extra_body={"input_type": "passage"},
    )  # fmt: skip
    emb = resp.data[0].embedding
    vec = np.frombuffer(base64.b64decode(emb), "<f4") if isinstance(emb, str) else np.array(emb)
    assert_close([vec.tolist()], [g["embeddings"][0]], cases["atol"])


def test_tiny_checkpoint_serves(tmp_path, start_server) -> None:
    """`make checkpoint` output is accepted by `make serve` (a checkpoint other than golden)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
    from embed_serving.tiny import write_tiny_embedqa

    write_tiny_embedqa(tmp_path / "ck", seed=3)
    srv = start_server(PACKAGE, tmp_path / "ck")
    out = srv.predict({"queries": ["how do plants make energy?"], "passages": ["Photosynthesis"],
                       "compute_scores": True}).json()  # fmt: skip
    assert len(out["query_embeddings"][0]) == 32
    assert abs(np.linalg.norm(out["query_embeddings"][0]) - 1) < 1e-5
    srv.stop()
