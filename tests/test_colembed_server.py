"""colembed-3b end to end through its real Truss server with a tiny checkpoint: text queries
against image passages (URL, base64, data: URL), text passages, mixed, MaxSim scores, base64
multi-vector output, and image errors naming the passage. Images come from a real HTTP server
on 127.0.0.1 (the deployment setting IMAGE_ALLOW_PRIVATE_URLS lets the loopback through)."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from embed_serving.models.colembed import write_tiny_checkpoint

PACKAGE = "colembed-3b"


def page_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x, y, x + 20 + int(rng.integers(0, 60)), y + 10], fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PAGES = {"/page1.png": page_png(600, 800, 1), "/page2.png": page_png(900, 400, 2)}


class _Handler(BaseHTTPRequestHandler):
    slow_fetches = 0  # fetches of /slow/... started

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/slow/"):
            type(self).slow_fetches += 1
            time.sleep(1)
            self.path = "/page1.png"
        body = PAGES.get(self.path)
        if self.path == "/notimage":
            body, ctype = b"<html>hello</html>", "text/html"
        else:
            ctype = "image/png"
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    checkpoint = tmp_path_factory.mktemp("colembed") / "ck"
    write_tiny_checkpoint(checkpoint, seed=0)
    return start_server(PACKAGE, checkpoint, IMAGE_ALLOW_PRIVATE_URLS="true")


def maxsim(q: np.ndarray, p: np.ndarray) -> float:
    return float((q @ p.T).max(axis=1).sum())


def test_text_queries_against_image_and_text_passages(server, images) -> None:
    body = {
        "queries": ["revenue by region", "what does the chart show?"],
        "passages": [
            {"type": "image", "url": f"{images}/page1.png"},
            {"type": "image", "content": base64.b64encode(PAGES["/page2.png"]).decode()},
            "Quarterly revenue grew twelve percent.",
            {"type": "image", "url": f"{images}/page2.png", "text": "page two caption"},
        ],
        "compute_scores": True,
        "top_k": 2,
    }
    r = server.predict(body)
    assert r.status_code == 200, r.text
    out = r.json()
    queries = [np.asarray(q, np.float32) for q in out["query_embeddings"]]
    passages = [np.asarray(p, np.float32) for p in out["passage_embeddings"]]
    assert len(queries) == 2 and len(passages) == 4
    # One vector per real token (BOS, prefix, image block, text), unit norm.
    for vectors in queries + passages:
        assert vectors.ndim == 2 and vectors.shape[1] == 32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # Scores are MaxSim over the returned vectors; top_k ranks them.
    want = np.array([[maxsim(q, p) for p in passages] for q in queries])
    assert np.allclose(out["scores"], want, atol=1e-3)
    assert out["top_k"] == [list(np.argsort(-row, kind="stable")[:2]) for row in want]
    # Captioned page differs from the bare page only in its text.
    bare = server.predict({"passages": [{"type": "image", "url": f"{images}/page2.png"}]}).json()
    assert np.allclose(bare["passage_embeddings"][0], passages[1], atol=1e-5)
    assert passages[3].shape[0] > passages[1].shape[0]


def test_url_base64_and_data_url_agree(server, images) -> None:
    b64 = base64.b64encode(PAGES["/page1.png"]).decode()
    by_url = server.predict({"passages": [{"type": "image", "url": f"{images}/page1.png"}]})
    by_b64 = server.predict({"passages": [{"type": "image", "content": b64}]})
    by_data = server.embeddings(
        {"input": [f"data:image/png;base64,{b64}"], "input_type": "passage"}
    )
    assert by_data.status_code == 200, by_data.text
    a = np.asarray(by_url.json()["passage_embeddings"][0])
    assert np.allclose(a, by_b64.json()["passage_embeddings"][0], atol=1e-6)
    data = by_data.json()["data"][0]
    assert data["shape"] == list(a.shape)
    assert np.allclose(a, data["embedding"], atol=1e-6)


def test_batched_equals_one_at_a_time(server, images) -> None:
    passages = [
        "short text",
        {"type": "image", "url": f"{images}/page1.png"},
        "a somewhat longer text passage about quarterly revenue and margins",
        {"type": "image", "url": f"{images}/page2.png"},
    ]
    together = server.predict({"passages": passages, "batch_size": 4}).json()
    for i, passage in enumerate(passages):
        one = server.predict({"passages": [passage]}).json()["passage_embeddings"][0]
        assert np.allclose(one, together["passage_embeddings"][i], atol=1e-5)


def test_base64_output_with_shapes_and_scores_only(server, images) -> None:
    body = {
        "queries": ["sales chart"],
        "passages": [{"type": "image", "url": f"{images}/page1.png"}],
    }
    floats = server.predict(body).json()
    packed = server.predict({**body, "encoding_format": "base64"}).json()
    shape = packed["passage_embedding_shapes"][0]
    decoded = np.frombuffer(base64.b64decode(packed["passage_embeddings"][0]), "<f4").reshape(shape)
    assert np.allclose(decoded, floats["passage_embeddings"][0], atol=1e-7)
    scores_only = server.predict({**body, "compute_scores": True, "return_embeddings": False})
    out = scores_only.json()
    assert set(out) == {"model", "scores", "usage"}
    q, p = np.asarray(floats["query_embeddings"][0]), np.asarray(floats["passage_embeddings"][0])
    assert abs(out["scores"][0][0] - maxsim(q, p)) < 1e-3


@pytest.mark.parametrize(
    ("passage", "words"),
    [
        ({"type": "image", "url": "/missing.png"}, ["passages[1]", "404"]),
        ({"type": "image", "url": "/notimage"}, ["passages[1]", "image"]),
        ({"type": "image", "url": "ftp://example.com/x.png"}, ["passages[1]", "scheme"]),
        ({"type": "image", "content": "not base64!!"}, ["passages[1]", "base64"]),
        ({"type": "image", "content": base64.b64encode(b"plain text").decode()}, ["passages[1]"]),
        ({"type": "image"}, ["passages[1]", "url", "content"]),
    ],
)
def test_bad_images_name_the_passage(server, images, passage, words) -> None:
    if passage.get("url", "").startswith("/"):
        passage = {**passage, "url": images + passage["url"]}
    r = server.predict({"queries": ["q"], "passages": ["fine", passage]})
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"], r.json()["error"]
    assert server.predict({"queries": ["still alive"]}).status_code == 200


def test_images_refused_for_queries(server, images) -> None:
    r = server.predict({"queries": [{"type": "image", "url": f"{images}/page1.png"}]})
    assert r.status_code == 400 and "queries[0]" in r.json()["error"]


def test_openai_client_multivector(server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-locally")
    resp = client.embeddings.create(
        model="nvidia/llama-nemoretriever-colembed-3b-v1", input=["what is revenue?"],
        encoding_format="float", extra_body={"input_type": "query"},
    )  # fmt: skip
    vectors = np.asarray(resp.data[0].embedding)
    assert vectors.ndim == 2 and vectors.shape[1] == 32


def test_query_limit_setting_applies(server) -> None:
    r = server.predict({"queries": ["word " * 600], "truncate": "NONE"})
    assert r.status_code == 400 and "MAX_QUERY_TOKENS" in r.json()["error"]
    ok = server.predict({"queries": ["word " * 600]})
    assert ok.json()["usage"]["prompt_tokens"] == 512


def test_tiny_checkpoint_is_deterministic(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path / "a", seed=5)
    write_tiny_checkpoint(tmp_path / "b", seed=5)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def small_response(tmp_path_factory, start_server):
    checkpoint = tmp_path_factory.mktemp("colembed-small") / "ck"
    write_tiny_checkpoint(checkpoint, seed=0)
    return start_server(PACKAGE, checkpoint, MAX_RESPONSE_BYTES="4000000")


def test_response_cap_from_characters_before_tokenising(small_response) -> None:
    # The case at 1/4 scale: 64 passages of 163,840 characters, truncate END. Each is
    # counted at least 163,840 / 16 characters = 10,240 tokens (its limit), so the multi-vector
    # answer cannot fit in 4 MB: a 413 from the character estimate ("at least"), before any
    # tokeniser pass.
    text = ("photosynthesis " * 11000)[:163840]
    start = time.monotonic()
    r = small_response.predict({"passages": [text] * 64, "truncate": "END"})
    elapsed = time.monotonic() - start
    assert r.status_code == 413, r.text[:300]
    message = r.json()["error"]
    assert "at least" in message and "MAX_RESPONSE_BYTES" in message, message
    # Tokenising 10 MB of text alone takes seconds on this CPU; the refusal is a length check.
    assert elapsed < 5, elapsed
    # Under the estimate, the exact count after tokenising still applies: 30 short passages
    # of ~6 tokens each fit, 30 passages of ~600 tokens do not (and are not "at least").
    ok = small_response.predict({"passages": ["photosynthesis"] * 30})
    assert ok.status_code == 200, ok.text[:300]
    r = small_response.predict({"passages": ["a b c d " * 150] * 30})
    assert r.status_code == 413 and "at least" not in r.json()["error"], r.text[:300]


def test_client_that_hangs_up_stops_its_fetches(server, images) -> None:
    # 64 pages that take 1 s each, 8 at a time (IMAGE_FETCH_CONCURRENCY): 8 s of fetching.
    # The client leaves after 1.5 s; once the fetches in flight then have finished, no new
    # one may start.
    import httpx

    _Handler.slow_fetches = 0
    passages = [{"type": "image", "url": f"{images}/slow/{i}.png"} for i in range(64)]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{server.url}/v1/models/model:predict", json={"passages": passages}, timeout=1.5
        )
    time.sleep(1.5)
    settled = _Handler.slow_fetches
    time.sleep(3)
    assert _Handler.slow_fetches == settled, (settled, _Handler.slow_fetches)
    assert settled <= 32, settled
    r = server.predict({"passages": [{"type": "image", "url": f"{images}/page1.png"}]})
    assert r.status_code == 200, r.text[:300]
