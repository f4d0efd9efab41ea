"""The clients users already have, driven against the real Truss server: the `openai` SDK,
Baseten's `baseten-performance-client`, LangChain's `NVIDIAEmbeddings` and LlamaIndex's
`NVIDIAEmbedding`. Every client's vectors are compared with the same texts sent by hand (httpx,
`encoding_format: float`, an explicit `input_type`), and with the golden outputs where a golden
group fits, so that a client that silently asks for the wrong input type or decodes the wrong
bytes fails here."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import assert_close

from tools.local_server import TrussServer

PACKAGE = "embedqa-1b-v2"
MODEL = "nvidia/llama-3.2-nv-embedqa-1b-v2"
# The golden server runs with MAX_INPUT_TOKENS=48 (`server_48`): the golden truncating groups
# were cut there, and a too-long input is cheap to send.
LIMIT = 48
LONG = " ".join(f"word{i}" for i in range(120))  # well over 48 tokens
ATOL = 1e-5  # the same texts, batched differently (the engine is batch-invariant to ~1e-6)


def direct(srv: TrussServer, texts: list[str], input_type: str, **extra: Any) -> np.ndarray:
    """What the server answers to a hand-written request: the reference for every client."""
    body = {"input": texts, "model": MODEL, "input_type": input_type, "encoding_format": "float"}
    r = httpx.post(f"{srv.url}/v1/embeddings", json={**body, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(texts)))
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def golden_group(cases: dict, kind: str) -> dict:
    """The golden group of `kind` cut at 48 tokens (what `truncate: END` gives at LIMIT)."""
    return next(g for g in cases["groups"] if g["max_length"] == LIMIT and g["kind"] == kind)


def assert_differ(a: Any, b: Any) -> None:
    diff = float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
    assert diff > 1e-3, f"query and passage embeddings agree (max |diff| {diff})"


# --- openai -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(server_48: TrussServer) -> Any:
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    return openai.OpenAI(base_url=f"{server_48.url}/v1", api_key="unused-locally", max_retries=0)


def test_openai_default_base64_equals_float_equals_httpx(cases, server_48, oai) -> None:
    g = golden_group(cases, "passage")
    texts = g["texts"]
    extra = {"input_type": "passage", "truncate": "END"}
    # The SDK asks for base64 when encoding_format is not given, and decodes it itself.
    raw = oai.embeddings.with_raw_response.create(model=MODEL, input=texts, extra_body=extra)
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    assert all(isinstance(d["embedding"], str) for d in json.loads(raw.text)["data"])
    default = [d.embedding for d in raw.parse().data]
    floats = oai.embeddings.create(
        model=MODEL, input=texts, encoding_format="float", extra_body=extra
    )
    by_hand = direct(server_48, texts, "passage", truncate="END")
    assert_close(default, by_hand, 0.0)  # base64 float32 bytes are exact
    assert_close([d.embedding for d in floats.data], by_hand, 1e-6)  # JSON floats round-trip
    assert_close(default, g["embeddings"], cases["atol"])
    assert floats.usage.prompt_tokens == sum(g["token_counts"])


def test_openai_model_suffix_selects_input_type(server_48, oai) -> None:
    texts = ["how do plants make energy?", "Photosynthesis converts light into energy."]
    passage = oai.embeddings.create(model=f"{MODEL}-passage", input=texts)
    query = oai.embeddings.create(model=f"{MODEL}-query", input=texts)
    plain = oai.embeddings.create(model=MODEL, input=texts)  # DEFAULT_INPUT_TYPE: query
    want_passage = direct(server_48, texts, "passage")
    want_query = direct(server_48, texts, "query")
    assert_close([d.embedding for d in passage.data], want_passage, 1e-6)
    assert_close([d.embedding for d in query.data], want_query, 1e-6)
    assert_close([d.embedding for d in plain.data], want_query, 1e-6)
    assert_differ(want_passage, want_query)


def test_openai_error_message_reaches_the_exception(server_48, oai) -> None:
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    # /v1/embeddings defaults to truncate NONE (as NIM): too long is a 400 naming the limit.
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=MODEL, input=["short", LONG])
    e = info.value
    assert e.status_code == 400
    for part in ("input[1]", str(LIMIT), "MAX_INPUT_TOKENS", "truncate"):
        assert part in e.message, e.message  # not just "Error code: 400"
        assert part in str(e)
    assert isinstance(e.body, dict) and e.body["message"] in e.message
    assert e.type == "invalid_request_error"
    # A suffix that contradicts input_type, and a Matryoshka size the model lacks.
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(
            model=f"{MODEL}-passage", input="x", extra_body={"input_type": "query"}
        )
    assert "-passage" in info.value.message and info.value.param == "input_type"
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=MODEL, input="x", dimensions=100)
    assert "`dimensions` must be one of" in info.value.message and "100" in info.value.message
    assert info.value.param == "dimensions"


@pytest.fixture(scope="module")
def wide_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> TrussServer:
    """A tiny checkpoint 512 wide (the golden one is 16 wide, too narrow for Matryoshka 384),
    served by a deployment that requires the input type to be said."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
    from embed_serving.tiny import write_tiny_embedqa

    ck = tmp_path_factory.mktemp("wide") / "ck"
    write_tiny_embedqa(ck, seed=5, hidden=512, layers=1)
    return start_server(PACKAGE, ck, DEFAULT_INPUT_TYPE="required")


def test_openai_dimensions_384(wide_server) -> None:
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    client = openai.OpenAI(base_url=f"{wide_server.url}/v1", api_key="x", max_retries=0)
    texts = ["how do plants make energy?", "the Eiffel Tower is in Paris"]
    full = direct(wide_server, texts, "query")
    assert full.shape == (2, 512)
    short = client.embeddings.create(model=f"{MODEL}-query", input=texts, dimensions=384)
    got = np.asarray([d.embedding for d in short.data], dtype=np.float32)
    assert got.shape == (2, 384)
    assert_close(np.linalg.norm(got, axis=1), [1.0, 1.0], 1e-5)
    head = full[:, :384]
    assert_close(got, head / np.linalg.norm(head, axis=1, keepdims=True), 1e-5)
    assert_differ(got, full[:, :384])  # renormalised, not merely cut


def test_openai_required_input_type(wide_server) -> None:
    """DEFAULT_INPUT_TYPE=required: a request that says neither is a 400 naming both ways."""
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    client = openai.OpenAI(base_url=f"{wide_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="how do plants make energy?")
    assert info.value.param == "input_type"
    for part in ("input_type", "-passage", "-query"):
        assert part in info.value.message, info.value.message
    said = client.embeddings.create(model=MODEL, input="x", extra_body={"input_type": "passage"})
    assert_close([said.data[0].embedding], direct(wide_server, ["x"], "passage"), 1e-6)


def test_openai_binary_embeddings_need_an_explicit_encoding_format(wide_server) -> None:
    """`embedding_type` ubinary / binary through the SDK: say `encoding_format`. Left out, the
    SDK asks for base64 and decodes the packed bits as float32, silently (512 bits = 64 bytes =
    16 meaningless floats)."""
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    client = openai.OpenAI(base_url=f"{wide_server.url}/v1", api_key="x", max_retries=0)
    texts = ["how do plants make energy?", "the Eiffel Tower is in Paris"]
    signs = np.packbits(direct(wide_server, texts, "passage") > 0, axis=1)  # (2, 64) uint8
    model, ubinary = f"{MODEL}-passage", {"embedding_type": "ubinary"}
    packed = client.embeddings.create(
        model=model, input=texts, encoding_format="base64", extra_body=ubinary
    )
    got = [np.frombuffer(base64.b64decode(d.embedding), np.uint8) for d in packed.data]
    assert np.array_equal(np.stack(got), signs)
    as_ints = client.embeddings.create(
        model=model, input=texts, encoding_format="float", extra_body=ubinary
    )
    assert np.array_equal(np.asarray([d.embedding for d in as_ints.data]), signs)
    signed = client.embeddings.create(
        model=model, input=texts, encoding_format="float", extra_body={"embedding_type": "binary"}
    )
    assert np.array_equal(np.asarray([d.embedding for d in signed.data]), signs.astype(int) - 128)
    misread = client.embeddings.create(model=model, input=texts, extra_body=ubinary)
    assert len(misread.data[0].embedding) == 16  # the pitfall the README warns about


# --- baseten-performance-client ---------------------------------------------------------------


def test_performance_client_1000_passages_with_suffix(server_48) -> None:
    bpc = pytest.importorskip(
        "baseten_performance_client", reason="baseten-performance-client is a dev dependency"
    )
    texts = [f"passage {i}: note {i * 7919 % 1000} on topic {i % 37}" for i in range(1000)]
    # base_url is the deployment root: the client appends /v1/embeddings itself.
    client = bpc.PerformanceClient(base_url=server_48.url, api_key="unused-locally")
    pref = bpc.RequestProcessingPreference(batch_size=16, max_concurrent_requests=8, timeout_s=120)
    resp = client.embed(input=texts, model=f"{MODEL}-passage", preference=pref)
    assert [d.index for d in resp.data] == list(range(len(texts)))
    got = resp.numpy()
    assert got.shape == (1000, 16)
    # Reference: the same texts as passages, in batches of another size than the client's ...
    want = np.concatenate(
        [direct(server_48, texts[i : i + 250], "passage") for i in range(0, len(texts), 250)]
    )
    assert_close(got, want, ATOL)
    # ... and one by one for a sample.
    sample = random.Random(0).sample(range(len(texts)), 20)
    for i in sample:
        assert_close(got[i : i + 1], direct(server_48, [texts[i]], "passage"), ATOL)
    # Without the suffix the same client gets queries (the deployment's default).
    assert_differ(got[sample], direct(server_48, [texts[i] for i in sample], "query"))


def test_performance_client_error_carries_the_message(server_48) -> None:
    bpc = pytest.importorskip(
        "baseten_performance_client", reason="baseten-performance-client is a dev dependency"
    )
    requests = pytest.importorskip("requests", reason="the client raises requests' HTTPError")
    client = bpc.PerformanceClient(base_url=server_48.url, api_key="unused-locally")
    pref = bpc.RequestProcessingPreference(max_retries=0)
    with pytest.raises(requests.exceptions.HTTPError) as info:
        client.embed(input=["short", LONG], model=f"{MODEL}-passage", preference=pref)
    text = str(info.value)
    assert "400" in text and "MAX_INPUT_TOKENS" in text and str(LIMIT) in text


def test_performance_client_on_a_deployment_that_requires_input_type(wide_server) -> None:
    """The performance client cannot send input_type: where the deployment requires one,
    the bare model name is refused with a message that points at the suffix, which works."""
    bpc = pytest.importorskip(
        "baseten_performance_client", reason="baseten-performance-client is a dev dependency"
    )
    requests = pytest.importorskip("requests", reason="the client raises requests' HTTPError")
    client = bpc.PerformanceClient(base_url=wide_server.url, api_key="unused-locally")
    pref = bpc.RequestProcessingPreference(max_retries=0, batch_size=4)
    texts = [f"chunk {i}" for i in range(10)]
    with pytest.raises(requests.exceptions.HTTPError) as info:
        client.embed(input=texts, model=MODEL, preference=pref)
    assert "400" in str(info.value) and f"{MODEL}-passage" in str(info.value)
    got = client.embed(input=texts, model=f"{MODEL}-passage", preference=pref).numpy()
    assert_close(got, direct(wide_server, texts, "passage"), ATOL)


# --- langchain-nvidia-ai-endpoints ------------------------------------------------------------


def langchain_embeddings(srv: TrussServer, **kw: Any) -> Any:
    lc = pytest.importorskip(
        "langchain_nvidia_ai_endpoints", reason="langchain-nvidia-ai-endpoints is a dev dependency"
    )
    return lc.NVIDIAEmbeddings(base_url=f"{srv.url}/v1", api_key="unused-locally", **kw)


def test_langchain_query_documents_and_truncation(cases, server_48) -> None:
    emb = langchain_embeddings(server_48, model=MODEL, truncate="END")
    q = golden_group(cases, "query")
    query = emb.embed_query(q["texts"][0])
    assert_close([query], direct(server_48, q["texts"][:1], "query", truncate="END"), 1e-6)
    assert_close([query], q["embeddings"][:1], cases["atol"])
    # embed_documents sends input_type passage, in requests of max_batch_size (50) texts.
    texts = [f"document {i} about subject {i % 11}" for i in range(60)]
    docs = emb.embed_documents(texts)
    want = direct(server_48, texts, "passage")
    assert_close(docs, want, ATOL)
    assert_differ(docs[:3], direct(server_48, texts[:3], "query"))
    p = golden_group(cases, "passage")
    assert_close(emb.embed_documents(p["texts"]), p["embeddings"], cases["atol"])
    # The async path sends the same requests.
    assert_close([asyncio.run(emb.aembed_query(q["texts"][0]))], [query], 1e-6)
    # truncate END: a long input is cut to the limit and embedded; NONE (the client's default,
    # as NIM's) refuses it, and our message reaches the exception the client raises.
    cut = emb.embed_documents([LONG])
    assert_close(cut, direct(server_48, [LONG], "passage", truncate="END"), 1e-6)
    strict = langchain_embeddings(server_48, model=MODEL)
    assert strict.truncate == "NONE"
    with pytest.raises(Exception, match="MAX_INPUT_TOKENS") as info:
        strict.embed_documents(["short", LONG])
    assert "input[1]" in str(info.value) and "400" in str(info.value)


def test_langchain_without_model_needs_v1_models(server_48) -> None:
    """Without `model` the client lists GET /v1/models, a route Truss does not serve: always
    pass `model` (the README says so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="404"):
            langchain_embeddings(server_48)


# --- llama-index-embeddings-nvidia ------------------------------------------------------------


def llama_index_embedding(srv: TrussServer, **kw: Any) -> Any:
    li = pytest.importorskip(
        "llama_index.embeddings.nvidia", reason="llama-index-embeddings-nvidia is a dev dependency"
    )
    return li.NVIDIAEmbedding(base_url=f"{srv.url}/v1", api_key="unused-locally", **kw)


def test_llama_index_text_and_query_embeddings(cases, server_48) -> None:
    emb = llama_index_embedding(server_48, model=MODEL, truncate="END")
    texts = [f"node {i} of the index, chunk {i % 5}" for i in range(12)]
    want_passage = direct(server_48, texts, "passage")
    want_query = direct(server_48, texts, "query")
    assert_close([emb.get_text_embedding(texts[0])], want_passage[:1], 1e-6)
    assert_close(emb.get_text_embedding_batch(texts), want_passage, ATOL)  # base64 underneath
    assert_close([asyncio.run(emb.aget_query_embedding(texts[1]))], want_query[1:2], 1e-6)
    # llama-index-embeddings-nvidia (0.3 to 0.6.0) sends input_type "passage" from the
    # synchronous get_query_embedding (its async twin sends "query"): the README tells users
    # to call aget_query_embedding. If this fails, the client was fixed: update the README.
    assert_close([emb.get_query_embedding(texts[1])], want_passage[1:2], 1e-6)
    assert_differ(want_passage, want_query)
    p = golden_group(cases, "passage")
    assert_close(emb.get_text_embedding_batch(p["texts"]), p["embeddings"], cases["atol"])
    # truncate NONE (the client's default) refuses a long input with our message.
    openai = pytest.importorskip("openai", reason="llama-index's client is the openai SDK")
    strict = llama_index_embedding(server_48, model=MODEL, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="MAX_INPUT_TOKENS"):
        strict.get_text_embedding(LONG)


def test_llama_index_without_model_needs_v1_models(server_48) -> None:
    openai = pytest.importorskip("openai", reason="llama-index's client is the openai SDK")
    with pytest.raises(openai.NotFoundError):
        llama_index_embedding(server_48, max_retries=0)


# --- the base64 the SDKs decode is the float32 bytes ------------------------------------------


def test_base64_is_little_endian_float32(server_48) -> None:
    texts = ["one", "two"]
    r = httpx.post(
        f"{server_48.url}/v1/embeddings",
        json={"input": texts, "model": f"{MODEL}-passage", "encoding_format": "base64"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    got = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
    assert_close(got, direct(server_48, texts, "passage"), 1e-6)


# --- colembed: multi-vectors through the same clients -----------------------------------------

COLEMBED = "nvidia/llama-nemoretriever-colembed-3b-v1"


@pytest.fixture(scope="module")
def colembed_server(golden, start_server) -> TrussServer:
    # The same deployment as the README's colembed examples (tests/test_readme_examples.py).
    return start_server(
        "colembed-3b", golden / "colembed-3b" / "checkpoint", share=True,
        IMAGE_ALLOW_PRIVATE_URLS="true",
    )  # fmt: skip


def colembed_direct(srv: TrussServer, texts: list[str], input_type: str) -> list[np.ndarray]:
    body = {"input": texts, "model": COLEMBED, "input_type": input_type, "encoding_format": "float"}
    r = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [np.asarray(d["embedding"], dtype=np.float32) for d in r.json()["data"]]


def test_colembed_openai_base64_multivectors_and_suffix(colembed_server) -> None:
    """The SDK decodes a multi-vector's base64 into one flat list; the item's `shape` (kept by
    the SDK as an extra field) gives it back its tokens x dim form."""
    openai = pytest.importorskip("openai", reason="openai is a dev dependency (requirements-dev)")
    client = openai.OpenAI(base_url=f"{colembed_server.url}/v1", api_key="x", max_retries=0)
    texts = ["Revenue grew 12% in every region.", "a short one"]
    want = colembed_direct(colembed_server, texts, "passage")
    resp = client.embeddings.create(model=f"{COLEMBED}-passage", input=texts)
    for d, w in zip(resp.data, want, strict=True):
        shape = (d.model_extra or {}).get("shape")
        assert shape == list(w.shape), shape
        assert_close(np.asarray(d.embedding, np.float32).reshape(shape), w, 1e-6)
    queries = colembed_direct(colembed_server, texts[:1], "query")
    assert queries[0].shape != want[0].shape or not np.allclose(queries[0], want[0], atol=1e-3)


def test_colembed_performance_client_with_suffix(colembed_server) -> None:
    """The performance client parses `embedding` as one list of floats: a multi-vector (a list
    of token vectors) comes back only as base64, which it hands over undecoded."""
    bpc = pytest.importorskip(
        "baseten_performance_client", reason="baseten-performance-client is a dev dependency"
    )
    client = bpc.PerformanceClient(base_url=colembed_server.url, api_key="unused-locally")
    texts = [f"page {i} of the annual report" for i in range(12)]
    pref = bpc.RequestProcessingPreference(batch_size=5, max_concurrent_requests=3, max_retries=0)
    model = f"{COLEMBED}-passage"
    resp = client.embed(input=texts, model=model, encoding_format="base64", preference=pref)
    want = colembed_direct(colembed_server, texts, "passage")
    assert [d.index for d in resp.data] == list(range(len(texts)))
    for d, w in zip(resp.data, want, strict=True):
        got = np.frombuffer(base64.b64decode(d.embedding), "<f4").reshape(-1, w.shape[1])
        assert_close(got, w, ATOL)
    # JSON floats (nested lists) are beyond its response type: the README says use base64.
    with pytest.raises(ValueError, match="parse"):
        client.embed(input=texts[:2], model=model, preference=pref)
