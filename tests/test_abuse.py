"""Hostile and oversized requests through the real server (embedqa, golden checkpoint): each is
a 4xx that names the field or the setting, never a 5xx, and the server answers correctly
afterwards; plus a bounded property-based fuzz of both routes; plus NIM's conventions on
/v1/embeddings (model suffix, embedding_type)."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PACKAGE = "embedqa-1b-v2"
MODEL = "nvidia/llama-3.2-nv-embedqa-1b-v2"
QUERY = {"queries": ["what is photosynthesis?"]}


@pytest.fixture(scope="module")
def small(golden, start_server):
    """Small caps so that the limits are reached with cheap requests."""
    return start_server(
        PACKAGE,
        golden / PACKAGE / "checkpoint",
        MAX_REQUEST_BYTES="200000",
        MAX_RESPONSE_BYTES="100000",
        MAX_INPUT_TOKENS="64",
        DEFAULT_INPUT_TYPE="required",
        REQUEST_BODY_TIMEOUT_S="2",
        CONNECTION_IDLE_TIMEOUT_S="2",
    )


@pytest.fixture(scope="module")
def reference(small) -> list:
    r = small.predict(QUERY)
    assert r.status_code == 200, r.text
    return r.json()["query_embeddings"]


def _post(server, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        server.url + path,
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=60,
    )


def _still_correct(server, reference) -> None:
    r = server.predict(QUERY)
    assert r.status_code == 200 and r.json()["query_embeddings"] == reference
    assert httpx.get(server.url + "/v1/models/model", timeout=5).status_code == 200


RAW_CASES = [
    ("lone surrogate in a key", b'{"queries": ["a"], "x\\ud800": 1}', 400, "JSON"),
    ("lone surrogate in a text", b'{"queries": ["a\\udc00b"]}', 400, "JSON"),
    ("invalid utf-8", b'{"queries": ["\xff\xfe"]}', 400, "UTF-8"),
    ("nested 1100 deep", b'{"queries": ' + b"[" * 1100 + b"]" * 1100 + b"}", 400, "JSON"),
    ("5000-digit integer", b'{"queries": ["a"], "batch_size": ' + b"9" * 5000 + b"}", 400, "JSON"),
    ("NaN", b'{"queries": ["a"], "top_k": NaN}', 400, "JSON"),
    ("empty body", b"", 400, "empty"),
    ("nested in a field", b'{"queries": ["a"], "dimensions": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "dimensions"),
    ("unknown huge key", b'{"queries": ["a"], "' + b"k" * 100000 + b'": 1}', 400, "unknown"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "status", "word"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_malformed_bodies_are_4xx(small, reference, name, raw, status, word) -> None:
    for path in ("/v1/models/model:predict", "/v1/embeddings"):
        r = _post(small, path, raw)
        assert r.status_code == status, (name, path, r.status_code, r.text[:300])
        error = r.json()["error"]
        message = error["message"] if path == "/v1/embeddings" else error
        # On /v1/embeddings the predict fields are themselves unknown: any named reason.
        assert word in message or path == "/v1/embeddings", message
        assert "Traceback" not in message and len(message) < 1000, message
    _still_correct(small, reference)


def test_body_cap_before_parsing(small, reference) -> None:
    big = b'{"queries": ["' + b"a " * 200000 + b'"]}'
    r = _post(small, "/v1/models/model:predict", big)
    assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["error"], r.text[:300]
    _still_correct(small, reference)


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _head(path: str, *lines: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()  # fmt: skip


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response read off a raw socket: status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("path", ["/v1/models/model:predict", "/v1/embeddings"])
def test_declared_oversized_body_refused_before_reading(small, reference, path) -> None:
    # Only the head is sent: the 413 must come without the server waiting for 300 MB.
    with _connect(small) as sock:
        start = time.monotonic()
        sock.sendall(_head(path, "Content-Length: 300000000"))
        status, headers, body = _response(sock)
        assert status == 413 and time.monotonic() - start < 5
        assert "x-baseten-error-code" in headers, headers  # as Truss marks a model's errors
    error = json.loads(body)["error"]
    if path == "/v1/embeddings":
        assert error["code"] == "request_too_large" and error["param"] is None, error
        error = error["message"]
    assert "300000000" in error and "MAX_REQUEST_BYTES" in error, error
    _still_correct(small, reference)


def test_streamed_body_refused_at_the_cap(small, reference) -> None:
    # No Content-Length: the 413 comes once the cap (200000) is passed, while the client is
    # still writing a 50 MB body, and the connection stays usable for the server.
    chunk = b"a" * 65536
    sent = 0
    with _connect(small) as sock:
        sock.sendall(_head("/v1/models/model:predict", "Transfer-Encoding: chunked"))
        sock.sendall(b'10\r\n{"queries": ["aa\r\n')
        sock.setblocking(False)
        answer = b""
        while sent < 50_000_000 and not answer:
            try:
                answer = sock.recv(65536)
                break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(b"%x\r\n%s\r\n" % (len(chunk), chunk)) and len(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 50_000_000
        assert b"MAX_REQUEST_BYTES" in answer or b"content-length" in answer.lower()
    _still_correct(small, reference)


def test_stalled_body_gets_408_and_is_closed(small, reference) -> None:
    # REQUEST_BODY_TIMEOUT_S=2 on this server: 10 of 1000 promised bytes, then nothing.
    with _connect(small) as sock:
        sock.sendall(_head("/v1/embeddings", "Content-Length: 1000") + b'{"input": ')
        start = time.monotonic()
        status, headers, body = _response(sock)
        assert status == 408 and 1.5 < time.monotonic() - start < 15, status
        assert "REQUEST_BODY_TIMEOUT_S" in json.loads(body)["error"]["message"]
        assert headers.get("connection") == "close"
        assert _closed_by_server(sock, within=5)
    _still_correct(small, reference)


def test_idle_connections_are_closed(small, reference) -> None:
    # CONNECTION_IDLE_TIMEOUT_S=2 on this server. Silent connections, one that sent half a
    # request head, and one idle after a response: all closed; requests meanwhile are served.
    silent = [_connect(small) for _ in range(100)]
    partial = _connect(small)
    partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
    used = _connect(small)
    used.sendall(b"GET /v1/models/model HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _response(used)[0] == 200
    _still_correct(small, reference)  # served while 102 connections sit idle
    start = time.monotonic()
    for sock in [*silent, partial, used]:
        assert _closed_by_server(sock, within=max(0.1, 10 - (time.monotonic() - start)))
        sock.close()
    assert time.monotonic() - start < 10
    # An active request's connection is not idle: a slow body that keeps coming is read.
    with _connect(small) as sock:
        body = json.dumps(QUERY).encode()
        sock.sendall(_head("/v1/models/model:predict", f"Content-Length: {len(body)}"))
        for i in range(0, len(body), 4):
            sock.sendall(body[i : i + 4])
            time.sleep(0.4)  # 13 pieces: 5 s, longer than either timeout, never 2 s apart
        status, _, answer = _response(sock)
        assert status == 200 and json.loads(answer)["query_embeddings"] == reference
    _still_correct(small, reference)


def test_gzip_body_decoded_within_the_cap(small, reference) -> None:
    r = _post(small, "/v1/models/model:predict", gzip.compress(b'{"queries": ["what is photosynthesis?"]}'),
              **{"Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 200 and r.json()["query_embeddings"] == reference
    bomb = gzip.compress(b'{"queries": ["' + b"a" * 5_000_000 + b'"]}')
    assert len(bomb) < 200000
    r = _post(small, "/v1/models/model:predict", bomb, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"], r.text[:300]
    r = _post(small, "/v1/models/model:predict", b"{}", **{"Content-Encoding": "br"})
    assert r.status_code == 415, r.text
    r = _post(small, "/v1/models/model:predict", b"not gzip", **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    _still_correct(small, reference)


def test_long_text_refused_or_cut_before_tokenising(small, reference) -> None:
    text = "photosynthesis " * 10000  # 150k characters, far over 64 tokens x 16
    r = small.predict({"passages": [text], "truncate": "NONE"})
    assert r.status_code == 400 and "INPUT_CHARS_PER_TOKEN" in r.json()["error"]
    cut = small.predict({"passages": [text], "truncate": "END"})
    assert cut.status_code == 200, cut.text
    whole = small.predict({"passages": ["photosynthesis " * 100], "truncate": "END"})
    # Cutting characters first keeps exactly the tokens truncation keeps.
    np.testing.assert_allclose(cut.json()["passage_embeddings"], whole.json()["passage_embeddings"], atol=1e-6)  # fmt: skip
    _still_correct(small, reference)


def test_response_cap_before_model_work(small, reference) -> None:
    # 200 x 32-d floats ~ 100 kB of JSON > the 100000-byte cap; base64 fits.
    texts = [f"text {i}" for i in range(400)]
    r = small.predict({"passages": texts})
    assert r.status_code == 413, r.text[:300]
    message = r.json()["error"]
    assert "MAX_RESPONSE_BYTES" in message and "base64" in message, message
    ok = small.predict({"passages": texts, "encoding_format": "base64"})
    assert ok.status_code == 200 and len(ok.content) <= 100000
    _still_correct(small, reference)


PARAM_CASES = [
    ({"input": ["a", 5], "input_type": "query"}, 400, "input[1]"),
    ({"input": "a", "input_type": "query", "dimensions": 7}, 400, "dimensions"),
    ({"input": ["a"], "input_type": "query", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": ["a"], "model": "the-model"}, 400, "model"),
    ({"input": ["x" * 2000], "input_type": "passage"}, 400, "input[0]"),
    ({"input": ["DATA:image/png;base64,iVBORw0KGgo="], "input_type": "passage"}, 400, "input[0]"),
    # Messages that begin with an ordinary word name no field.
    ({"input": [f"the text {i}" for i in range(400)], "input_type": "passage"}, 413, None),
    ({"input": ["a"], "input_type": "query", "x": 1}, 400, None),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "param"), PARAM_CASES)
def test_openai_param_is_the_field_at_fault(small, body, status, param) -> None:
    r = small.embeddings(body)
    assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param, error


def test_upper_case_data_url_is_an_image(small) -> None:
    # Not text: a text model refuses it as an image, naming the item.
    for url in ("DATA:image/png;base64,iVBORw0KGgo=", "Data:Image/PNG;base64,iVBORw0KGgo="):
        r = small.predict({"passages": ["a text", url]})
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"].startswith("passages[1]: images are not accepted"), r.text


def test_input_type_required_and_model_suffix(small) -> None:
    r = small.embeddings({"input": ["a"], "model": MODEL})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input_type" and "-passage" in error["message"], error
    suffixed = small.embeddings({"input": ["a text"], "model": f"{MODEL}-passage"})
    stated = small.embeddings({"input": ["a text"], "model": MODEL, "input_type": "passage"})
    query = small.embeddings({"input": ["a text"], "model": f"{MODEL}-query"})
    assert suffixed.status_code == stated.status_code == query.status_code == 200
    assert suffixed.json()["data"] == stated.json()["data"]
    assert suffixed.json()["data"] != query.json()["data"]
    clash = small.embeddings({"input": ["a"], "model": f"{MODEL}-query", "input_type": "passage"})
    assert clash.status_code == 400 and "-query" in clash.json()["error"]["message"]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_binary_embedding_types(small, encoding) -> None:
    body = {"input": ["a text", "another"], "model": f"{MODEL}-passage"}
    floats = np.array([d["embedding"] for d in small.embeddings(body).json()["data"]])
    for kind, dtype in (("ubinary", np.uint8), ("binary", np.int8)):
        r = small.embeddings({**body, "embedding_type": kind, "encoding_format": encoding})
        assert r.status_code == 200, r.text
        got = [d["embedding"] for d in r.json()["data"]]
        if encoding == "base64":
            got = [np.frombuffer(base64.b64decode(g), dtype=dtype) for g in got]
        got = np.array(got).astype(np.int16)
        bits = np.packbits(floats > 0, axis=-1).astype(np.int16)
        want = bits if kind == "ubinary" else bits - 128
        assert got.shape == (2, floats.shape[1] // 8)
        np.testing.assert_array_equal(got, want)
    r = small.embeddings({**body, "embedding_type": "int8"})
    assert r.status_code == 400 and "embedding_type" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("IMAGE_FETCH_TIMEOUT_S", "nan"), ("IMAGE_FETCH_TIMEOUT_S", "inf"), ("MAX_REQUEST_BYTES", "-1"),
     ("DEFAULT_INPUT_TYPE", "document"), ("MAX_INPUT_TOKENS", "lots"), ("BATCH_MAX_ITEMS", "0")],
)  # fmt: skip
def test_bad_settings_fail_before_loading(monkeypatch, name: str, value: str) -> None:
    # TrussModel.load() runs check_env() before it resolves or reads any weight.
    from embed_serving.settings import SettingError, check_env

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError, match=name):
        check_env()


SETTING_NAMES = [
    "MAX_INPUT_TOKENS", "MAX_QUERY_TOKENS", "MAX_PASSAGE_TOKENS", "MAX_ITEMS_PER_REQUEST",
    "BATCH_MAX_ITEMS", "BATCH_MAX_TOKENS", "MAX_TOP_K", "MAX_QUEUE_TOKENS", "PREPARE_THREADS",
    "MAX_REQUEST_BYTES", "MAX_INFLIGHT_BYTES", "MAX_RESPONSE_BYTES", "INPUT_CHARS_PER_TOKEN",
    "REQUEST_BODY_TIMEOUT_S", "CONNECTION_IDLE_TIMEOUT_S", "DEFAULT_INPUT_TYPE",
    "IMAGE_MAX_BYTES", "IMAGE_MAX_PIXELS", "IMAGE_FETCH_TIMEOUT_S", "IMAGE_MAX_REDIRECTS",
    "IMAGE_ALLOW_PRIVATE_URLS", "IMAGE_FETCH_CONCURRENCY", "IMAGE_FETCH_DEADLINE_S",
    "IMAGE_DECODE_BUDGET_PIXELS", "IMAGE_MEMORY_BUDGET_BYTES",
]  # fmt: skip
_setting_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.sampled_from(["", " ", "1_000", "0", "-0", "1e3", "0x10", "true", "off", "nan", "inf",
                     "4294967297", str(1 << 50), "9" * 5000, "\u0661\u0662", "query"]),
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_REQUEST_BYTES", str(1 << 50)), ("MAX_INFLIGHT_BYTES", str(1 << 40)),
     ("IMAGE_DECODE_BUDGET_PIXELS", "1000"), ("IMAGE_MEMORY_BUDGET_BYTES", "2000000"),
     ("INPUT_CHARS_PER_TOKEN", "1000000"), ("REQUEST_BODY_TIMEOUT_S", "0"),
     ("CONNECTION_IDLE_TIMEOUT_S", "nan")],
)  # fmt: skip
def test_caps_that_remove_the_cap_are_refused(monkeypatch, name: str, value: str) -> None:
    from embed_serving.settings import SettingError, check_env

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError, match=name):
        check_env()


@settings(max_examples=400, deadline=None)
@given(env=st.dictionaries(st.sampled_from(SETTING_NAMES), _setting_values, max_size=4))
def test_fuzz_settings(env: dict[str, str]) -> None:
    # check_env either accepts the environment or raises SettingError naming a variable set.
    import os

    from embed_serving.settings import SettingError, check_env

    saved = {name: os.environ.pop(name, None) for name in SETTING_NAMES}
    try:
        os.environ.update(env)
        try:
            check_env()
        except SettingError as e:
            assert any(name in str(e) for name in env), (env, str(e))
    finally:
        for name in SETTING_NAMES:
            os.environ.pop(name, None)
            if saved[name] is not None:
                os.environ[name] = saved[name]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(
    ["queries", "passages", "query", "documents", "input", "input_type", "model", "truncate",
     "encoding_format", "embedding_type", "dimensions", "batch_size", "top_k", "compute_scores",
     "return_embeddings", "modality", "instruction", "x"]
)  # fmt: skip
_bodies = st.dictionaries(_fields, _json | st.lists(st.text(min_size=1, max_size=30), max_size=5))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, route=st.sampled_from(["/v1/models/model:predict", "/v1/embeddings"]))
def test_fuzz_never_5xx(small, reference, body, route) -> None:
    r = httpx.post(small.url + route, json=body, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, dict if route == "/v1/embeddings" else str), error


def test_fuzz_leaves_server_correct(small, reference) -> None:
    _still_correct(small, reference)
