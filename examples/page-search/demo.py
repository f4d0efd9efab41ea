"""page-search end to end on this machine: a tiny RANDOM-weight colembed-3b checkpoint served
by the package's real Truss server on 127.0.0.1, sample PDFs and images, then the CLI's index
and search commands exactly as a user types them. The scores are meaningless (random
weights); the demo shows the plumbing: rendering, concurrent requests, the store, resume,
FDE candidates and the MaxSim rerank.

    make page-search-demo          (= python examples/page-search/demo.py)
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "shared"), str(HERE)]

from make_samples import write_samples  # noqa: E402

from embed_serving.models.colembed import write_tiny_checkpoint  # noqa: E402
from tools.local_server import TrussServer  # noqa: E402


def run(*args: str) -> None:
    print(f"\n$ python -m page_search {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "page_search", *args], cwd=HERE, check=True)


def main() -> None:
    work = ROOT / "build" / "page-search-demo"
    shutil.rmtree(work, ignore_errors=True)
    docs, db = work / "docs", work / "index"
    write_tiny_checkpoint(work / "checkpoint", seed=0)
    write_samples(docs, pdfs=3, pages=3, images=2, corrupt=True)
    print(f"sample documents (two of them corrupt on purpose) in {docs}")
    print("starting the colembed-3b server (tiny RANDOM weights: scores mean nothing) ...")
    server = TrussServer("colembed-3b", work / "checkpoint", work, {})
    url = ["--url", f"{server.url}/v1/models/model:predict"]
    try:
        run("index", str(docs), "--db", str(db), *url)
        run("index", str(docs), "--db", str(db), *url)  # resume: nothing left to embed
        run("search", "quarterly revenue by region", "--db", str(db), *url)
        run("search", "quarterly revenue by region", "--db", str(db), "--exact", *url)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
