"""Every code block of the README's "API" section (its "Clients" included) runs against the real
Truss server, as a user would run it: the same text, with only the deployment's address
substituted. A block added to the section is picked up without touching this file.

The rule (README "Development"):

- Blocks tagged `python` run as a script (`python block.py`), `sh` / `bash` / `shell` with
  `bash -e -o pipefail`; `json` blocks are responses and are not run. Any other tag fails.
- A block targets `embedqa-1b-v2` unless the line right before its opening fence says
  otherwise: `<!-- package: colembed-3b -->`.
- `https://model-{ID}.api.baseten.co` (Python) and `https://model-$ID.api.baseten.co` (shell)
  become the address of a local stand-in for Baseten's gateway: it accepts
  `Authorization: Api-Key <key>` or `Bearer <key>` with the key in `BASETEN_API_KEY` (set by
  the test, as is `ID`), answers 401 otherwise, and forwards `/environments/production/predict`
  to the package's `/v1/models/model:predict` and `/environments/production/sync/<path>` to
  `/<path>` on its real Truss server (`tools/local_server.py`, tiny checkpoints).
- `https://example.com/<path>` becomes a local HTTP server that serves a page image (PNG) for
  every path ending in `.png` (the colembed server runs with `IMAGE_ALLOW_PRIVATE_URLS=true`).
- Nothing else in the text changes.

Each block must exit 0 having sent at least one request through the gateway, every one
answered 200 (a curl block: printing a JSON body). Then it runs again against a gateway that
answers every request with HTTP 400: it must fail and say 400, i.e. check the status
(`raise_for_status()`, `curl --fail-with-body`, or a client that raises), rather than fail
later on a missing key or carry on with an error body."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import GOLDEN

from tools.local_server import ROOT, TrussServer

RUNNERS = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh"}
NOT_RUN = {"json"}  # responses shown after a request
DEFAULT_PACKAGE = "embedqa-1b-v2"
DEPLOYMENT = re.compile(r"https://model-(\{ID\}|\$ID|\$\{ID\})\.api\.baseten\.co")
EXAMPLE_HOST = "https://example.com/"
PACKAGE_TAG = re.compile(r"<!--\s*package:\s*([\w.-]+)\s*-->")
KEY = "test-" + secrets.token_hex(8)
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    package: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}-{self.package}"


def readme_blocks() -> list[Block]:
    """The fenced blocks of the README's `## API` section, in order."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## API")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    blocks: list[Block] = []
    i = start
    while i < end:
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            close = next(j for j in range(i + 1, end) if lines[j].startswith("```"))
            tag = PACKAGE_TAG.fullmatch(lines[i - 1].strip())
            package = tag.group(1) if tag else DEFAULT_PACKAGE
            blocks.append(Block(i + 1, lang, "\n".join(lines[i + 1 : close]) + "\n", package))
            i = close
        i += 1
    return blocks


BLOCKS = readme_blocks()
RUN = [b for b in BLOCKS if b.lang not in NOT_RUN]


# --- the stand-in for Baseten's gateway, and the image host ----------------------------------


class Gateway:
    """Baseten's routing and key check in front of one package's Truss server."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse = False  # answer every request with 400
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status)
        self.client = httpx.Client(timeout=TIMEOUT_S)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                gateway.handle(self)

            def do_POST(self) -> None:  # noqa: N802
                gateway.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def route(self, path: str) -> str | None:
        prefix = "/environments/production/"
        if not path.startswith(prefix):
            return None
        rest = path[len(prefix) :]
        if rest == "predict":
            return "/v1/models/model:predict"
        if rest.startswith("sync/"):
            return "/" + rest[len("sync/") :]
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        target = self.route(h.path)
        auth = h.headers.get("Authorization", "")
        headers: dict[str, str] = {}
        if target is None:
            status, out = 404, {"error": f"no such route {h.path}"}
        elif auth not in (f"Api-Key {KEY}", f"Bearer {KEY}"):
            status, out = 401, {"error": "missing or wrong API key"}
        elif self.refuse:
            status, out = 400, {"error": "refused by the README test's gateway"}
        else:
            forward = {k: v for k, v in h.headers.items() if k.lower() in _FORWARDED}
            url = self.upstream + target
            r = self.client.request(h.command, url, headers=forward, content=body)
            status, out = r.status_code, r.content
            headers = {k: v for k, v in r.headers.items() if k.lower() in _RETURNED}
        payload = out if isinstance(out, bytes) else json.dumps(out).encode()
        self.seen.append((h.command, h.path, status))
        h.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def close(self) -> None:
        self.httpd.shutdown()
        self.client.close()


# httpx hands the body over decoded: the response goes back without a Content-Encoding.
_FORWARDED = {"content-type", "content-encoding", "accept", "user-agent"}
_RETURNED = {"content-type", "retry-after"}


class ImageHost:
    """`https://example.com/...png`: a page image from the golden fixtures, from 127.0.0.1."""

    def __init__(self) -> None:
        page = (GOLDEN / "colembed-3b" / "images" / "page_600x900.png").read_bytes()
        self.fetched: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                host.fetched.append(self.path)
                found = self.path.endswith(".png")
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(page) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


# --- the deployments the blocks talk to -------------------------------------------------------


def _deployment(package: str, start_server, tmp: pytest.TempPathFactory) -> TrussServer:
    if package == "embedqa-1b-v2":
        # 512 wide (the golden checkpoint is 16 wide): the examples ask for Matryoshka 384.
        from embed_serving.tiny import write_tiny_embedqa

        checkpoint = tmp.mktemp("readme-embedqa") / "ck"
        write_tiny_embedqa(checkpoint, seed=5, hidden=512, layers=1)
        return start_server(package, checkpoint)
    if package == "colembed-3b":
        # Shared with tests/test_clients.py (the same package, checkpoint and settings).
        return start_server(
            package, GOLDEN / package / "checkpoint", share=True, IMAGE_ALLOW_PRIVATE_URLS="true"
        )
    if (GOLDEN / package / "checkpoint").is_dir():
        return start_server(package, GOLDEN / package / "checkpoint", share=True)
    raise AssertionError(f"README block for an unknown package {package!r}")


@pytest.fixture(scope="module")
def gateways(start_server, tmp_path_factory) -> Iterator[dict[str, Gateway]]:
    """Started on first use: one gateway (and server) per package the blocks target."""
    started: dict[str, Gateway] = {}

    class Lazy(dict):
        def __missing__(self, package: str) -> Gateway:
            server = _deployment(package, start_server, tmp_path_factory)
            started[package] = self[package] = Gateway(server.url)
            return self[package]

    yield Lazy()
    for gateway in started.values():
        gateway.close()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.httpd.shutdown()


def run_block(block: Block, gateway: Gateway, images: ImageHost, workdir: Path):
    code = DEPLOYMENT.sub(gateway.url, block.code).replace(EXAMPLE_HOST, images.url)
    env = {**os.environ, "ID": "readme-test", "BASETEN_API_KEY": KEY, "NO_PROXY": "127.0.0.1"}
    if RUNNERS[block.lang] == "python":
        script = workdir / f"{block.id}.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        script = workdir / f"{block.id}.sh"
        script.write_text(code)
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


# --- the tests --------------------------------------------------------------------------------


def test_the_api_section_has_its_examples() -> None:
    # Guards against the parametrised tests below silently collecting nothing.
    assert len(RUN) >= 9, [b.id for b in BLOCKS]
    unknown = [b.id for b in BLOCKS if b.lang not in RUNNERS and b.lang not in NOT_RUN]
    assert not unknown, f"README API blocks with no runner (tag them python / sh / json): {unknown}"
    for block in RUN:
        assert DEPLOYMENT.search(block.code), f"{block.id} does not call the deployment's URL"


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_block_runs(block: Block, gateways, images: ImageHost, tmp_path: Path) -> None:
    if RUNNERS[block.lang] == "sh" and shutil.which("curl") is None:
        pytest.skip("curl is not installed here; the shell examples use it")
    gateway = gateways[block.package]
    gateway.refuse, gateway.seen, images.fetched = False, [], []
    done = run_block(block, gateway, images, tmp_path)
    output = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, output
    assert gateway.seen, f"{block.id} sent no request to the deployment"
    assert all(status == 200 for _, _, status in gateway.seen), (gateway.seen, output)
    if EXAMPLE_HOST in block.code:
        assert images.fetched, "the image URL was not fetched from the image host"
    if RUNNERS[block.lang] == "sh":
        json.loads(done.stdout)  # curl printed the response body


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_block_checks_the_http_status(
    block: Block, gateways, images: ImageHost, tmp_path: Path
) -> None:
    if RUNNERS[block.lang] == "sh" and shutil.which("curl") is None:
        pytest.skip("curl is not installed here; the shell examples use it")
    gateway = gateways[block.package]
    gateway.refuse, gateway.seen = True, []
    try:
        done = run_block(block, gateway, images, tmp_path)
    finally:
        gateway.refuse = False
    output = done.stdout + done.stderr
    assert gateway.seen, f"{block.id} sent no request to the deployment"
    assert done.returncode != 0, f"{block.id} carried on after an HTTP 400:\n{output[-3000:]}"
    assert "400" in output, f"{block.id} failed without reporting the 400:\n{output[-3000:]}"
