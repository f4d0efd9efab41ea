"""examples/page-search end to end against the real colembed-3b Truss server with a tiny
checkpoint: index generated PDFs and images into LanceDB (and Qdrant local), kill the indexer
mid-run and resume without losing or duplicating a page, skip and report corrupt files and a
page the server refuses, honour 429/503 Retry-After, and rank exactly as the server's own
`compute_scores` does. The tiny model's scores mean nothing; the rankings must still agree."""

from __future__ import annotations

import base64
import email.utils
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from make_samples import write_samples
from page_search.__main__ import main
from page_search.pages import Page, find_sources, render_pages
from page_search.store import LanceStore, QdrantStore
from PIL import Image

from embed_serving.models.colembed import write_tiny_checkpoint
from tools.local_server import ROOT

PACKAGE = "colembed-3b"
EXAMPLE = ROOT / "examples" / "page-search"
DPI = "36"  # small renders: the tiny model tiles them all the same, and it keeps the test fast
QUERY = "quarterly revenue by region"
# The server's image pixel cap, and a page over it: refused with a 400, the run goes on.
MAX_PIXELS = 2_000_000
BAD_FILES = {"broken.pdf", "huge.png", "truncated.png"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    checkpoint = tmp_path_factory.mktemp("colembed") / "ck"
    write_tiny_checkpoint(checkpoint, seed=0)
    return start_server(PACKAGE, checkpoint, IMAGE_MAX_PIXELS=str(MAX_PIXELS))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    write_samples(folder, pdfs=3, pages=3, images=2, corrupt=True)
    Image.new("RGB", (2000, 1500), "white").save(folder / "huge.png")  # 3 MP > MAX_PIXELS
    return folder


@pytest.fixture(scope="module")
def good_pages(docs: Path) -> list[Page]:
    """Every page the index must end up with, rendered as the tool renders them."""
    pages = []
    for source in find_sources(docs):
        if source.rel not in BAD_FILES:
            pages += render_pages(source, [1, 2, 3] if source.kind == "pdf" else [1], float(DPI))
    assert len(pages) == 11
    return pages


def server_answer(server, pages: list[Page], **extra: object) -> dict:
    """One predict of QUERY against `pages`: scores, FDEs and multi-vectors (base64)."""
    passages = [{"type": "image", "content": base64.b64encode(p.image).decode()} for p in pages]
    body = {"queries": [QUERY], "passages": passages, "compute_scores": True, "fde": True}
    r = server.predict({**body, "encoding_format": "base64", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def ranking(pages: list[Page], scores: list[float]) -> list[tuple[str, int, float]]:
    ranked = sorted(zip(pages, scores, strict=True), key=lambda x: (-x[1], x[0].file, x[0].page))
    return [(p.file, p.page, s) for p, s in ranked]


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


@pytest.fixture(scope="module")
def server_pages(server, good_pages: list[Page]) -> dict:
    return server_answer(server, good_pages)


@pytest.fixture(scope="module")
def server_ranking(server_pages: dict, good_pages: list[Page]) -> list[tuple[str, int, float]]:
    """The server's own MaxSim ranking of every good page for QUERY (compute_scores)."""
    return ranking(good_pages, server_pages["scores"][0])


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    """The CLI in this process (its imports are paid once); its --json output, parsed."""
    capsys.readouterr()
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def index_args(docs: Path, db: Path, url: str, *more: str) -> list[str]:
    return ["index", str(docs), "--db", str(db), "--url", url, "--dpi", DPI, "--no-progress", *more]


def predict_url(server) -> str:
    return f"{server.url}/v1/models/model:predict"


def assert_ranking(hits: list[dict], want: list[tuple[str, int, float]]) -> None:
    assert [(h["file"], h["page"]) for h in hits] == [(f, p) for f, p, _ in want[: len(hits)]]
    assert np.allclose([h["score"] for h in hits], [s for *_, s in want[: len(hits)]], atol=1e-4)


def test_index_kill_resume_and_search(
    server, docs, good_pages, server_pages, server_ranking, tmp_path, capsys
):
    db, url = tmp_path / "index", predict_url(server)
    # 1. The CLI as a user runs it, one page per request, killed (SIGKILL: no clean-up at all)
    #    after it has stored 4 pages.
    proc = subprocess.Popen(
        [sys.executable, "-m", "page_search",
         *index_args(docs, db, url, "--batch-pages", "1", "--concurrency", "1", "--log-pages")],
        cwd=EXAMPLE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    stored = []
    while len(stored) < 4:
        try:
            stored.append(json.loads(lines.get(timeout=90)))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"indexer stored {len(stored)} pages in 90 s: {proc.stderr.read()}")
    assert proc.poll() is None, "the indexer finished before it could be killed"
    proc.kill()
    proc.wait()
    before = LanceStore(db / "lancedb").catalog()
    assert {(s["indexed"], s["page"]) for s in stored} <= set(before)
    assert 4 <= len(before) < 11

    # 2. Resume (several pages per request, concurrent): only the missing pages are embedded.
    report = cli(capsys, *index_args(docs, db, url, "--batch-pages", "4", "--concurrency", "2"))
    assert report["skipped"] == len(before)
    assert report["embedded"] == 11 - len(before)
    # Corrupt files and the page the server refuses are reported by name, and skipped.
    failed = {f["file"]: f["error"] for f in report["failed"]}
    assert set(failed) == BAD_FILES
    assert "not a readable PDF" in failed["broken.pdf"]
    assert "not a readable image" in failed["truncated.png"]
    assert "HTTP 400" in failed["huge.png"] and "IMAGE_MAX_PIXELS" in failed["huge.png"]
    # Every page exactly once, with the hash of what was embedded, and exactly the server's
    # multi-vector and FDE for it.
    store = LanceStore(db / "lancedb")
    assert store.count() == 11 == report["indexed_total"]
    catalog = store.catalog()
    assert {k: v.sha256 for k, v in catalog.items()} == {
        (p.file, p.page): p.sha256 for p in good_pages
    }
    records = {(r.key.file, r.key.page): r for chunk in store.scan() for r in chunk}
    for i, page in enumerate(good_pages):
        stored = records[(page.file, page.page)]
        shape = server_pages["passage_embedding_shapes"][i]
        assert np.array_equal(
            stored.vectors, floats(server_pages["passage_embeddings"][i]).reshape(shape)
        )
        assert np.array_equal(stored.fde, floats(server_pages["passage_fde"][i]))

    # 3. A third run finds everything indexed and embeds nothing.
    again = cli(capsys, *index_args(docs, db, url))
    assert (again["embedded"], again["skipped"]) == (0, 11)

    # 4. Search: FDE candidates (all pages here) + MaxSim rerank, and --exact, both rank as
    #    the server's compute_scores does.
    search = ["search", QUERY, "--db", str(db), "--url", url, "-k", "5"]
    assert_ranking(cli(capsys, *search, "--candidates", "100"), server_ranking)
    assert_ranking(cli(capsys, *search, "--exact"), server_ranking)
    # With fewer candidates than pages, the candidates are the FDE dot-product top-N of the
    # stored encodings, each reranked with its exact score.
    query_fde = floats(server_pages["query_fde"][0])
    by_fde = sorted(records.values(), key=lambda rec: -float(rec.fde @ query_fde))[:4]
    exact = {(f, p): s for f, p, s in server_ranking}
    want = sorted(
        ((rec.key.file, rec.key.page, exact[(rec.key.file, rec.key.page)]) for rec in by_fde),
        key=lambda x: (-x[2], x[0], x[1]),
    )
    assert_ranking(cli(capsys, *search[:-1], "3", "--candidates", "4"), want)


def test_qdrant_local_store_with_pooling(server, docs, good_pages, tmp_path, capsys):
    # The same interface on the other back-end, on a subset (one PDF and one image), with the
    # server pooling each page's vectors (pool_factor 2).
    names = ("report-2.pdf", "scan-2.jpg")
    subset = tmp_path / "docs"
    subset.mkdir()
    for name in names:
        (subset / name).write_bytes((docs / name).read_bytes())
    pages = [p for p in good_pages if p.file in names]
    db, url = tmp_path / "index", predict_url(server)
    args = index_args(subset, db, url, "--store", "qdrant", "--pool-factor", "2")
    report = cli(capsys, *args)
    assert (report["embedded"], report["indexed_total"], report["failed"]) == (4, 4, [])
    assert cli(capsys, *args)["skipped"] == 4
    # The index remembers how it was built: other settings are refused, naming them.
    assert main([*args[:-1], "1"]) == 1
    assert "pool_factor=2" in capsys.readouterr().err

    want = server_answer(server, pages, pool_factor=2)
    store = QdrantStore(db / "qdrant")
    try:
        records = {(r.key.file, r.key.page): r for chunk in store.scan() for r in chunk}
    finally:
        store.close()
    assert set(records) == {(p.file, p.page) for p in pages}
    for i, page in enumerate(pages):
        shape = want["passage_embedding_shapes"][i]
        stored = records[(page.file, page.page)].vectors
        assert np.array_equal(stored, floats(want["passage_embeddings"][i]).reshape(shape))
    # Search needs no --store (the index records it) and ranks as compute_scores does on the
    # pooled pages.
    search = ["search", QUERY, "--db", str(db), "--url", url, "-k", "3"]
    assert_ranking(cli(capsys, *search), ranking(pages, want["scores"][0]))
    assert_ranking(cli(capsys, *search, "--exact"), ranking(pages, want["scores"][0]))
    # A file deleted from the folder leaves the index with --prune (and only then).
    (subset / "scan-2.jpg").unlink()
    assert cli(capsys, *args)["pruned"] == 0
    report = cli(capsys, *args, "--prune")
    assert (report["pruned"], report["embedded"], report["indexed_total"]) == (1, 0, 3)


class _Flaky(BaseHTTPRequestHandler):
    """A loopback proxy in front of the real server that answers what `answers` says, in turn
    (None: forward), then forwards: the server's back-pressure (429, 503 with Retry-After as
    seconds or as an HTTP date), on demand."""

    target = ""
    answers: list[tuple[int, str]] = []
    seen: list[tuple[float, int]] = []  # (arrival, status answered)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            status, retry_after = answer
            self.seen.append((time.monotonic(), status))
            if retry_after.startswith("+"):  # an HTTP date that many seconds from now
                retry_after = email.utils.formatdate(time.time() + float(retry_after), usegmt=True)
            self.send_response(status)
            self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        r = httpx.post(self.target, content=body, timeout=120,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        self.seen.append((time.monotonic(), r.status_code))
        self.send_response(r.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky(server) -> Iterator[type[_Flaky]]:
    handler = type("Flaky", (_Flaky,), {
        "target": predict_url(server), "answers": [None, (429, "1"), (503, "+2")], "seen": [],
    })  # fmt: skip
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield handler
    httpd.shutdown()


def test_retries_honour_retry_after(flaky, docs, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "scan-1.png").write_bytes((docs / "scan-1.png").read_bytes())
    report = cli(capsys, *index_args(one, tmp_path / "index", flaky.url))
    assert (report["embedded"], report["retries"], report["failed"]) == (1, 2, [])
    # The preflight request passes; the page's request gets 429, then 503, then goes through.
    _, (t429, s429), (t503, s503), (t200, s200) = flaky.seen
    assert (s429, s503, s200) == (429, 503, 200)
    assert t503 - t429 >= 0.95  # "Retry-After: 1"
    assert t200 - t503 >= 0.5  # an HTTP date 2 s ahead (whole seconds: at least 1 s less)


def test_settings_the_server_refuses_fail_once(server, docs, tmp_path, capsys):
    # An FDE parameter out of the server's range: one preflight request says so, and the run
    # stops before rendering, storing or recording anything (not one 400 per page).
    db = tmp_path / "index"
    assert main(index_args(docs, db, predict_url(server), "--fde-k-sim", "11")) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "k_sim" in err
    assert not db.exists()
