"""colembed at index scale: what token pooling and MUVERA FDEs cost and save.

1. Pooling overhead. Page images go through the golden colembed checkpoint's backend (the
   serving `forward`, one page at a time); each page's vectors are then pooled by our pooler
   (`embed_serving.pooling`, as the server runs it) and by colpali-engine's pooler (its exact
   calls, tests/reference.py), interleaved, on the same vectors. Reported: median milliseconds
   per page and pooling as a share of the page's embedding time. Then the same two poolers on
   vectors of a real page's shape (1,792 x 3072: 6 tiles + thumbnail x 256), where the
   embedding itself cannot run on this CPU.
2. Storage table. Fixture pages (generated page images through the same checkpoint) and text
   queries, each representation against full float32 MaxSim: stored bytes per page (fixture
   shape, and a real page's shape), scoring time per 1,000 pages per query, and overlap@10 with
   full MaxSim's top 10. Scoring: MaxSim (`scoring.maxsim_scores`) for float32, bf16 (stored
   bf16, scored in float32), ubinary (stored packed signs, unpacked to +-1 and scored against
   the float query, the unpacking timed) and pooled vectors; a dot product for FDEs (query
   `process_query` vs page `process_document`, fastembed's defaults). Scoring times at the real
   shape are measured on a few random pages of that shape and scaled to 1,000 (FDEs have the
   same width whatever the page, so their fixture timing stands for both).

The weights are random: agreement with full MaxSim here is structural (how much of the ranking
a representation keeps on these vectors), not retrieval quality; see the README for published
quality numbers. Only ratios measured side by side in this run are comparable.

Run: python bench/bench_storage.py [--pages 200] [--queries 16] [--real-pages 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "tests"))
from reference import colpali_pool  # noqa: E402

from embed_serving import fde, pooling, scoring  # noqa: E402
from embed_serving.models.colembed_backend import ColEmbedBackend  # noqa: E402
from embed_serving.request import Item  # noqa: E402

CHECKPOINT = ROOT / "tests" / "golden" / "colembed-3b" / "checkpoint"
REAL_TOKENS, REAL_DIM = 1792, 3072  # 7 tiles x 256 vectors of 3072 dims
WORDS = [
    "revenue",
    "region",
    "quarter",
    "chart",
    "table",
    "figure",
    "growth",
    "margin",
    "cost",
    "sales",
    "page",
    "total",
    "year",
    "report",
    "summary",
    "market",
    "product",
    "segment",
    "share",
    "price",
    "volume",
    "forecast",
    "trend",
]


def page_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(200, 900)), int(rng.integers(200, 1100))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 30))):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        w, h = 10 + int(rng.integers(0, 120)), 5 + int(rng.integers(0, 60))
        draw.rectangle([x, y, x + w, y + h], fill=color)
    return image


def embed(backend: ColEmbedBackend, items: list[Item], kind: str) -> list[torch.Tensor]:
    prepared = backend.prepare(items, kind, None)  # type: ignore[arg-type]
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prepared), 16):
            out += [v.float().cpu() for v in backend.forward(prepared[start : start + 16])]
    return out


def page_items(backend: ColEmbedBackend, seeds: range) -> list[Item]:
    return [Item(pixel_values=backend.tile_image(page_image(s))) for s in seeds]


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def clustered(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Unit vectors in clusters (as a page's tokens are), not isotropic noise."""
    centers = torch.randn(max(1, n // 8), dim, generator=gen)
    pick = torch.randint(0, centers.shape[0], (n,), generator=gen)
    return F.normalize(centers[pick] + 0.3 * torch.randn(n, dim, generator=gen), dim=-1)


def pooling_overhead(backend: ColEmbedBackend, pages: int, real_pages: int) -> None:
    items = page_items(backend, range(10_000, 10_000 + pages))
    prepared = backend.prepare(items, "passage", None)
    embed_ms, ours_ms, ref_ms = [], [], []
    tokens = []
    for p in prepared:
        with torch.inference_mode():
            backend.forward([p])  # warm
        vectors: dict[str, torch.Tensor] = {}

        def forward(p: Any = p, vectors: dict = vectors) -> None:
            with torch.inference_mode():
                vectors["v"] = backend.forward([p])[0].float().cpu()

        forward()
        v = vectors["v"]
        tokens.append(v.shape[0])
        times = interleaved(
            {
                "embed": forward,
                "ours": lambda v=v: pooling.pool(v, 3),
                "ref": lambda v=v: colpali_pool(v, 3),
            },
            rounds=3,
        )
        embed_ms.append(1000 * statistics.median(times["embed"]))
        ours_ms.append(1000 * statistics.median(times["ours"]))
        ref_ms.append(1000 * statistics.median(times["ref"]))
    e, o, r = (statistics.median(x) for x in (embed_ms, ours_ms, ref_ms))
    share = statistics.median(100 * a / b for a, b in zip(ours_ms, embed_ms, strict=True))
    ref_share = statistics.median(100 * a / b for a, b in zip(ref_ms, embed_ms, strict=True))
    print(f"\n## 1. Pooling overhead (pool_factor 3), medians over {pages} pages x 3 rounds")
    print(f"fixture pages: {statistics.median(tokens):.0f} vectors x {v.shape[1]} dims (median)\n")
    print("| per page | embedding (forward) | our pooler | colpali-engine's pooler |")
    print("| --- | --- | --- | --- |")
    print(f"| fixture page, ms | {e:.1f} | {o:.2f} | {r:.2f} |")
    print(f"| share of the page's embedding time | 100% | {share:.1f}% | {ref_share:.1f}% |")

    gen = torch.Generator().manual_seed(0)
    real = [clustered(REAL_TOKENS, REAL_DIM, gen) for _ in range(real_pages)]
    ours_real, ref_real = [], []
    for v in real:
        pooling.pool(v, 3)  # warm
        times = interleaved(
            {"ours": lambda v=v: pooling.pool(v, 3), "ref": lambda v=v: colpali_pool(v, 3)},
            rounds=2,
        )
        ours_real.append(1000 * statistics.median(times["ours"]))
        ref_real.append(1000 * statistics.median(times["ref"]))
    o, r = statistics.median(ours_real), statistics.median(ref_real)
    print(
        f"| real page shape ({REAL_TOKENS} x {REAL_DIM}, {real_pages} pages), ms, all on this "
        f"CPU | – | {o:.0f} | {r:.0f} ({r / o:.1f}x ours) |"
    )


def overlap_at_10(scores: torch.Tensor, full: torch.Tensor) -> float:
    k = min(10, full.shape[1])
    want = full.topk(k, dim=1).indices
    got = scores.topk(k, dim=1).indices
    shared = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got, want, strict=True)]
    return statistics.mean(shared)


def unpack_signs(packed: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.unpackbits(p, axis=-1).astype(np.float32) * 2 - 1) for p in packed]


def representations(
    pages: list[torch.Tensor], queries: list[torch.Tensor]
) -> dict[str, tuple[Any, Callable[[], torch.Tensor], int]]:
    """name -> (stored form, scorer of all queries vs all pages, stored bytes of all pages)."""
    maxsim = scoring.maxsim_scores
    bf16 = [p.to(torch.bfloat16) for p in pages]
    packed = [np.packbits(p.numpy() > 0, axis=-1) for p in pages]
    pooled2 = [pooling.pool(p, 2) for p in pages]
    pooled3 = [pooling.pool(p, 3) for p in pages]
    params = fde.FdeParams()
    # FDE of the full multi-vector (what the server encodes when no pool_factor is given).
    page_fde = fde.encode(pages, params, document=True)
    query_fde = fde.encode(queries, params, document=False)
    return {
        "float32": (pages, lambda: maxsim(queries, pages), sum(4 * p.numel() for p in pages)),
        "bf16": (bf16, lambda: maxsim(queries, bf16), sum(2 * p.numel() for p in bf16)),
        "ubinary": (
            packed,
            lambda: maxsim(queries, unpack_signs(packed)),
            sum(p.nbytes for p in packed),
        ),
        "pool_factor 2": (
            pooled2,
            lambda: maxsim(queries, pooled2),
            sum(4 * p.numel() for p in pooled2),
        ),
        "pool_factor 3": (
            pooled3,
            lambda: maxsim(queries, pooled3),
            sum(4 * p.numel() for p in pooled3),
        ),
        "FDE (10,240-d)": (page_fde, lambda: query_fde @ page_fde.T, 4 * page_fde.numel()),
    }


def real_shape_bytes(name: str) -> int:
    n, d = REAL_TOKENS, REAL_DIM
    return {
        "float32": 4 * n * d,
        "bf16": 2 * n * d,
        "ubinary": n * d // 8,
        "pool_factor 2": 4 * (n // 2) * d,
        "pool_factor 3": 4 * (n // 3) * d,
        "FDE (10,240-d)": 4 * fde.FdeParams().dimensions(),
    }[name]


def storage_table(
    backend: ColEmbedBackend, n_pages: int, n_queries: int, real_pages: int, rounds: int
) -> None:
    pages = embed(backend, page_items(backend, range(n_pages)), "passage")
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n_queries)]
    queries = embed(backend, [Item(text=t) for t in texts], "query")
    reps = representations(pages, queries)
    full = reps["float32"][1]()
    times = interleaved({name: scorer for name, (_, scorer, _) in reps.items()}, rounds)

    # The same representations at a real page's shape: a few random pages, one 32-token query.
    gen = torch.Generator().manual_seed(1)
    real = [clustered(REAL_TOKENS, REAL_DIM, gen) for _ in range(real_pages)]
    real_query = [clustered(32, REAL_DIM, gen)]
    real_reps = representations(real, real_query)
    real_times = interleaved({name: scorer for name, (_, scorer, _) in real_reps.items()}, rounds)

    dim = pages[0].shape[1]
    tokens = statistics.mean(p.shape[0] for p in pages)
    print(
        f"\n## 2. Storage per page, scoring time, agreement with full MaxSim\n"
        f"fixture: {n_pages} pages (mean {tokens:.0f} vectors x {dim} dims, golden tiny "
        f"checkpoint), {n_queries} text queries; real shape: {REAL_TOKENS} x {REAL_DIM} "
        f"({real_pages} random pages, 1 query of 32 tokens, times scaled to 1,000 pages)\n"
    )
    print(
        "| representation | bytes/page (fixture) | bytes/page (real shape) | vs float32 "
        "| ms per 1,000 pages per query (fixture) | ms per 1,000 pages (real shape) "
        "| overlap@10 with full MaxSim (fixture) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, scorer, stored) in reps.items():
        per_page = stored / n_pages
        real_bytes = real_shape_bytes(name)
        ms = 1000 * statistics.median(times[name]) / n_queries / n_pages * 1000
        real_ms = 1000 * statistics.median(real_times[name]) / real_pages * 1000
        if name.startswith("FDE"):
            # Its width does not depend on the page: the fixture's 200-page timing holds, where
            # a few pages would measure call overhead only.
            real_ms = ms
        overlap = overlap_at_10(scorer(), full)
        print(
            f"| {name} | {per_page:,.0f} | {real_bytes:,} | "
            f"{real_shape_bytes('float32') / real_bytes:.0f}x | {ms:.2f} | "
            f"{real_ms:,.1f} | {overlap:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=200, help="fixture pages in the table")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--overhead-pages", type=int, default=12)
    parser.add_argument("--real-pages", type=int, default=4, help="random real-shape pages")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    backend = ColEmbedBackend(CHECKPOINT)
    print(
        f"# bench_storage: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {backend.device}"
    )
    pooling_overhead(backend, args.overhead_pages, args.real_pages)
    storage_table(backend, args.pages, args.queries, args.real_pages, args.rounds)
    print(
        "\nRandom weights: overlap@10 is structural agreement with full MaxSim on these vectors, "
        "not retrieval quality (README: published numbers)."
    )


if __name__ == "__main__":
    main()
