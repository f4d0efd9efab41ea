"""`make demo`: the three packages on their real Truss servers, with tiny RANDOM-weight
checkpoints, answering the README's example requests.

The weights are random: every number printed here is meaningless as a similarity. The demo
shows the packages run end to end (server, routes, validation, images, scoring)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "tools"))

from make_checkpoint import writers  # noqa: E402

BUILD = ROOT / "build" / "demo"
PORTS = {"embedqa-1b-v2": 18101, "nv-embed-v2": 18102, "colembed-3b": 18103}


def make_page(path: Path, title: str, bars: list[int]) -> None:
    """A small 'slide' with a title and a bar chart, like the pages colembed indexes."""
    image = Image.new("RGB", (800, 600), "white")
    draw = ImageDraw.Draw(image)
    draw.text((40, 30), title, fill="black")
    for i, height in enumerate(bars):
        draw.rectangle([80 + i * 120, 550 - height, 160 + i * 120, 550], fill=(40, 90, 200))
    image.save(path)


def serve_images(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def start(package: str, checkpoint: Path) -> subprocess.Popen:
    env = {**os.environ, "IMAGE_ALLOW_PRIVATE_URLS": "true"}  # the demo's images are local
    log = open(BUILD / f"{package}.log", "w")  # noqa: SIM115 - lives as long as the server
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), package,
           "--port", str(PORTS[package]), "--checkpoint", str(checkpoint),
           "--build-dir", str(BUILD / "serve")]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(package: str, proc: subprocess.Popen) -> str:
    url = f"http://127.0.0.1:{PORTS[package]}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"{package} server exited; see {BUILD / (package + '.log')}")
        try:
            if httpx.get(f"{url}/v1/models/model", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{package} server did not become ready")


def show(title: str, response: httpx.Response) -> None:
    body = response.json()

    def shorten(value: object) -> object:
        if isinstance(value, list) and value and isinstance(value[0], float):
            head = ", ".join(f"{v:.3f}" for v in value[:4])
            return f"[{head}, ... {len(value)} floats]"
        if isinstance(value, list):
            return [shorten(v) for v in value[:3]] + (
                [f"... {len(value)} items"] if len(value) > 3 else []
            )
        if isinstance(value, dict):
            return {k: shorten(v) for k, v in value.items()}
        if isinstance(value, str) and len(value) > 60:
            return value[:40] + f"... ({len(value)} chars)"
        return value

    print(f"\n--- {title}  [HTTP {response.status_code}]")
    print(json.dumps(shorten(body), indent=1)[:1500])


def main() -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    print("Building tiny RANDOM-weight checkpoints (official layouts; outputs are meaningless)")
    for package, write in writers().items():
        write(BUILD / "checkpoints" / package, 0)
    pages = BUILD / "pages"
    pages.mkdir(exist_ok=True)
    make_page(pages / "revenue.png", "Revenue by region 2023", [120, 300, 220, 410])
    make_page(pages / "headcount.png", "Headcount by team", [80, 90, 350, 60])
    httpd, images = serve_images(pages)

    print("Starting the three packages on Truss's own server (127.0.0.1)...")
    procs = {p: start(p, BUILD / "checkpoints" / p) for p in PORTS}
    try:
        urls = {p: wait_ready(p, proc) for p, proc in procs.items()}
        eq, nv, col = urls["embedqa-1b-v2"], urls["nv-embed-v2"], urls["colembed-3b"]
        predict = "/v1/models/model:predict"

        show("embedqa-1b-v2 predict: queries + passages + scores", httpx.post(eq + predict, json={
            "queries": ["how do plants make energy?"],
            "passages": ["Photosynthesis converts light into chemical energy.",
                         "The Eiffel Tower is in Paris."],
            "compute_scores": True, "top_k": 2}))  # fmt: skip
        show("embedqa-1b-v2 /v1/embeddings (NIM/OpenAI shape, 2048-d model -> dimensions)",
             httpx.post(eq + "/v1/embeddings", json={
                 "input": ["Photosynthesis converts light."], "model":
                 "nvidia/llama-3.2-nv-embedqa-1b-v2", "input_type": "passage"}))  # fmt: skip
        show(
            "embedqa-1b-v2 bad input -> 400 naming the field",
            httpx.post(eq + "/v1/embeddings", json={"input": ["ok", 5]}),
        )
        show("nv-embed-v2 predict with a task instruction", httpx.post(nv + predict, json={
            "queries": ["are judo throws allowed in wrestling?"],
            "passages": ["Judo throws are allowed in freestyle wrestling."],
            "instruction": "Given a web search query, retrieve relevant passages that answer "
                           "the query", "compute_scores": True}))  # fmt: skip
        b64 = base64.b64encode((pages / "headcount.png").read_bytes()).decode()
        show("colembed-3b: text query vs image pages (URL + base64) and text, MaxSim scores",
             httpx.post(col + predict, json={
                 "queries": ["revenue by region"],
                 "passages": [{"type": "image", "url": f"{images}/revenue.png"},
                              {"type": "image", "content": b64},
                              "Revenue grew twelve percent in every region."],
                 "compute_scores": True, "return_embeddings": False, "top_k": 3}))  # fmt: skip
        show("colembed-3b /v1/embeddings: data: URL image, base64 float32 with shape",
             httpx.post(col + "/v1/embeddings", json={
                 "input": [f"data:image/png;base64,{b64}"], "input_type": "passage",
                 "encoding_format": "base64"}))  # fmt: skip
        buf = io.BytesIO()
        Image.new("RGB", (10, 10)).save(buf, format="PNG")
        show(
            "colembed-3b: an image URL that 404s -> 400 naming the passage",
            httpx.post(
                col + predict,
                json={"passages": ["fine", {"type": "image", "url": f"{images}/missing.png"}]},
            ),
        )
        print("\nAll three packages answered. Reminder: random weights, meaningless scores.")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
        httpd.shutdown()
        print("Servers stopped.")


if __name__ == "__main__":
    main()
