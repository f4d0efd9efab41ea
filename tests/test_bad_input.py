"""Bad input through the real server: every case is a 400 that names the problem, and the
server keeps answering correctly afterwards."""

from __future__ import annotations

import httpx
import pytest

PACKAGE = "embedqa-1b-v2"
LONG = "word " * 9000  # > 8192 tokens

# (name, route, body, words the error must contain)
CASES: list[tuple[str, str, object, list[str]]] = [
    ("body not object", "predict", ["a"], ["JSON object"]),
    ("no inputs", "predict", {}, ["queries", "passages"]),
    ("queries not list", "predict", {"queries": "hi"}, ["queries", "list"]),
    ("empty queries", "predict", {"queries": []}, ["queries", "empty"]),
    ("query item wrong type", "predict", {"queries": ["a", 3]}, ["queries[1]", "string"]),
    ("passage item null", "predict", {"passages": ["a", None]}, ["passages[1]"]),
    ("empty string", "predict", {"passages": ["ok", "  "]}, ["passages[1]", "empty"]),
    ("unknown field", "predict", {"queries": ["a"], "foo": 1}, ["foo"]),
    ("batch_size zero", "predict", {"queries": ["a"], "batch_size": 0}, ["batch_size"]),
    ("batch_size string", "predict", {"queries": ["a"], "batch_size": "8"}, ["batch_size"]),
    ("batch_size over cap", "predict", {"queries": ["a"], "batch_size": 10**6}, ["batch_size", "64"]),
    ("compute_scores not bool", "predict", {"queries": ["a"], "passages": ["b"], "compute_scores": "yes"}, ["compute_scores"]),
    ("scores without passages", "predict", {"queries": ["a"], "compute_scores": True}, ["compute_scores"]),
    ("top_k without scores", "predict", {"queries": ["a"], "passages": ["b"], "top_k": 2}, ["top_k"]),
    ("unknown truncate", "predict", {"queries": ["a"], "truncate": "MIDDLE"}, ["truncate", "MIDDLE"]),
    ("unknown encoding", "predict", {"queries": ["a"], "encoding_format": "fp16"}, ["encoding_format"]),
    ("image url to text model", "predict", {"passages": [{"type": "image", "url": "http://127.0.0.1/x.png"}]}, ["passages[0]", "image"]),
    ("image b64 to text model", "predict", {"passages": ["t", {"type": "image", "content": "iVBORw0KGgo="}]}, ["passages[1]", "image"]),
    ("item bad type", "predict", {"passages": [{"type": "audio", "text": "x"}]}, ["passages[0].type"]),
    ("instruction unsupported", "predict", {"queries": ["a"], "instruction": "x"}, ["instruction"]),
    ("dimensions unsupported size", "predict", {"queries": ["a"], "dimensions": 100}, ["dimensions", "16"]),
    ("too many items", "predict", {"passages": ["x"] * 513}, ["513", "512", "MAX_ITEMS_PER_REQUEST"]),
    ("too long, NONE", "predict", {"passages": ["short", LONG], "truncate": "NONE"}, ["passages[1]", "8192", "MAX_INPUT_TOKENS"]),
    ("both query and queries", "predict", {"query": "a", "queries": ["b"]}, ["query"]),
    ("emb: no input", "embeddings", {"model": "nvidia/llama-3.2-nv-embedqa-1b-v2"}, ["input"]),
    ("emb: input wrong type", "embeddings", {"input": 5}, ["input"]),
    ("emb: empty list", "embeddings", {"input": []}, ["input", "empty"]),
    ("emb: item wrong type", "embeddings", {"input": ["a", {"x": 1}]}, ["input[1]"]),
    ("emb: token ids", "embeddings", {"input": [1, 2, 3]}, ["token"]),
    ("emb: unknown input_type", "embeddings", {"input": "a", "input_type": "document"}, ["input_type", "document"]),
    ("emb: unknown truncate", "embeddings", {"input": "a", "truncate": "LEFT"}, ["truncate"]),
    ("emb: unknown encoding", "embeddings", {"input": "a", "encoding_format": "int8"}, ["encoding_format"]),
    ("emb: wrong model", "embeddings", {"input": "a", "model": "text-embedding-3-small"}, ["model"]),
    ("emb: dimensions string", "embeddings", {"input": "a", "dimensions": "16"}, ["dimensions"]),
    ("emb: too long default NONE", "embeddings", {"input": ["a", LONG]}, ["input[1]", "8192"]),
    ("emb: data url image", "embeddings", {"input": ["data:image/png;base64,iVBORw0KGgo="]}, ["input[0]", "image"]),
    ("emb: too many", "embeddings", {"input": ["x"] * 600}, ["600", "MAX_ITEMS_PER_REQUEST"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def reference(server) -> list:
    r = server.predict({"queries": ["what is photosynthesis?"], "passages": ["Plants use light."]})
    assert r.status_code == 200
    return r.json()["query_embeddings"]


@pytest.mark.parametrize(("name", "route", "body", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_400(server, reference, name, route, body, words) -> None:
    r = server.predict(body) if route == "predict" else server.embeddings(body)
    assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]
    if route == "embeddings":  # OpenAI-shaped, so the openai SDK shows the message
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        message = error
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    # ... and the server still answers correctly.
    again = server.predict({"queries": ["what is photosynthesis?"], "passages": ["x"]})
    assert again.status_code == 200 and again.json()["query_embeddings"] == reference


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"\xff\xfe", b'{"queries": ["a"]'])
def test_invalid_json_is_400(server, reference, raw: bytes) -> None:
    for path in ("/v1/models/model:predict", "/v1/embeddings"):
        r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, raw, r.status_code, r.text[:200])
        error = r.json()["error"]
        message = error["message"] if path == "/v1/embeddings" else error
        assert "JSON" in message, message
    again = server.predict({"queries": ["what is photosynthesis?"]})
    assert again.json()["query_embeddings"] == reference
