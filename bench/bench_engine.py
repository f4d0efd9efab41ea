"""The serving engine through the real Truss server (`tools/serve.py`, as `make serve` runs it).

An embedqa-layout checkpoint with random weights, sized so a forward pass is not free (about
25M parameters: hidden 512, 8 layers), served on this machine's CPU in fp32. Clients are
asyncio httpx clients in this process. Measured, each side by side in this one run:

1. Cross-request batching: 256 short queries as 256 single-query requests at concurrency 32,
   versus the same queries as 8 requests of 32 sent one after another (the batched ideal), and
   one at a time (concurrency 1). Goal: single/batched >= 0.8.
2. The server's own cost per request: 200 one-query requests in sequence; the mean latency
   minus the mean forward-pass time the server itself reports on `/metrics`
   (`embed_forward_seconds`). Goal: <= 3 ms on this CPU.
3. A short query and the readiness probe while a 512-passage bulk request runs: their worst
   latency against their idle latency.
4. Overload: a second server with a small queue (MAX_QUEUE_TOKENS), 64 clients sending
   32-passage requests as fast as they can: accepted throughput, 429s with Retry-After, and
   no 5xx (any 5xx fails the benchmark).
5. Mixed traffic (fair queuing): a bulk request alone, then the same bulk request while
   `QUERY_CLIENTS` clients stream single-query requests (each sends its next as soon as the
   last is answered) until the bulk is done, twice, interleaved: the bulk's time against its
   fair share (alone x the requests active, 1 + QUERY_CLIENTS) and the queries' p50 / p99
   against the bulk's micro-batch time.

Absolute numbers are this machine's; the ratios are what carries over.

Run: python bench/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]
from embed_serving.tiny import write_tiny_embedqa  # noqa: E402
from tools.local_server import TrussServer  # noqa: E402

PACKAGE = "embedqa-1b-v2"
PREDICT = "/v1/models/model:predict"
BULK_WORDS = 16  # ~40-70 tokens per passage with the tiny tokenizer
# On this CPU a forward pass of the 25M model runs ~1-2k tokens/s: a small padded-token budget
# keeps one micro-batch (the longest a query can wait behind bulk work) around a second.
BATCH_ENV = {"BATCH_MAX_TOKENS": "2048", "BATCH_MAX_ITEMS": "64"}
READY = "/v1/models/model"


def queries(n: int, tag: str) -> list[str]:
    # ~12 tokens each with the tiny tokenizer, all distinct.
    return [
        f"what is the {tag} number {i} of region {i * 7 % 13} in year {2000 + i}" for i in range(n)
    ]


def passages(n: int, words: int, tag: str) -> list[str]:
    return [" ".join(f"{tag}{i}w{j}" for j in range(words - i % (words // 2))) for i in range(n)]


def forward_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of the server's forward-pass histogram."""
    text = httpx.get(f"{url}/metrics", follow_redirects=True, timeout=10).text

    def value(name: str) -> float:
        found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("embed_forward_seconds_sum"), value("embed_forward_seconds_count")


async def post(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    r = await client.post(PREDICT, json=body)
    if r.status_code >= 500:
        raise RuntimeError(f"server error {r.status_code}: {r.text[:300]}")
    return r


async def run_concurrently(url: str, bodies: list[dict], concurrency: int) -> float:
    """Send all bodies, `concurrency` in flight; wall time in seconds."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> None:
            async with gate:
                r = await post(client, body)
                assert r.status_code == 200, r.text[:300]

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start


def bench_batching(url: str, n: int, rows: list[str]) -> dict[str, float]:
    texts = queries(n, "warm")
    asyncio.run(run_concurrently(url, [{"queries": [t]} for t in texts[:64]], 32))  # warm up
    texts = queries(n, "batching")
    singles = [{"queries": [t]} for t in texts]
    grouped = [{"queries": texts[i : i + 32]} for i in range(0, n, 32)]
    t_batched = asyncio.run(run_concurrently(url, grouped, 1))
    t_c32 = asyncio.run(run_concurrently(url, singles, 32))
    t_c1 = asyncio.run(run_concurrently(url, singles, 1))
    ratio = t_batched / t_c32
    rows += [
        f"| 1 | {n} queries in requests of 32, one at a time | {n / t_batched:.0f} queries/s "
        "| 1.00 |",
        f"| 1 | {n} single-query requests, concurrency 32 | {n / t_c32:.0f} queries/s | "
        f"**{ratio:.2f}** (goal >= 0.8) |",
        f"| 1 | {n} single-query requests, concurrency 1 | {n / t_c1:.0f} queries/s | "
        f"{t_batched / t_c1:.2f} |",
    ]
    return {"single_vs_batched": ratio}


def bench_overhead(url: str, n: int, rows: list[str]) -> dict[str, float]:
    texts = queries(n, "overhead")
    s0, c0 = forward_seconds(url)
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for t in texts:
            start = time.perf_counter()
            r = client.post(PREDICT, json={"queries": [t]})
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 200
    s1, c1 = forward_seconds(url)
    model_ms = 1000 * (s1 - s0) / max(c1 - c0, 1)
    latency_ms = 1000 * statistics.mean(latencies)
    overhead = latency_ms - model_ms
    rows += [
        f"| 2 | one-query request, mean latency (client side) | {latency_ms:.2f} ms | |",
        f"| 2 | forward pass, mean (server's /metrics) | {model_ms:.2f} ms | |",
        f"| 2 | server's own time per request | **{overhead:.2f} ms** | (goal <= 3 ms) |",
    ]
    return {"overhead_ms": overhead, "query_forward_s": model_ms / 1000}


ECHO_MODEL = """
import orjson
from fastapi import Response
from starlette.requests import Request


class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        pass

    async def predict(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        return Response(content=orjson.dumps({"echo": body}), media_type="application/json")
"""


def bench_truss_floor(tmp: Path, n: int, rows: list[str]) -> None:
    """The same stack (Truss's server, uvicorn h11, this client) around a model that only
    echoes the body: the part of a request's cost that no model code can remove."""
    package = tmp / "echo"
    (package / "model").mkdir(parents=True)
    (package / "config.yaml").write_text("model_name: echo\npython_version: py311\n")
    (package / "model" / "model.py").write_text(ECHO_MODEL)
    server = TrussServer(str(package), None, tmp, {})
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            bodies = [{"queries": [q]} for q in queries(n + 20, "echo")]
            for body in bodies[:20]:
                client.post(PREDICT, json=body)
            start = time.perf_counter()
            for body in bodies[20:]:
                assert client.post(PREDICT, json=body).status_code == 200
            floor = 1000 * (time.perf_counter() - start) / n
    finally:
        server.stop()
    rows.append(
        f"| 2 | the same request to an echo model on the same stack (Truss floor) | "
        f"{floor:.2f} ms | |"
    )


def bench_bulk(url: str, bulk_n: int, query_forward_s: float, rows: list[str]) -> dict[str, float]:
    def timed(client: httpx.Client, method: str, path: str, body: dict | None = None) -> float:
        start = time.perf_counter()
        r = client.request(method, path, json=body)
        assert r.status_code == 200, r.text[:300]
        return time.perf_counter() - start

    with httpx.Client(base_url=url, timeout=600) as client:
        idle_q = statistics.median(
            timed(client, "POST", PREDICT, {"queries": [q]}) for q in queries(20, "idle")
        )
        idle_r = statistics.median(timed(client, "GET", READY) for _ in range(20))
        bulk = {"passages": passages(bulk_n, BULK_WORDS, "bulk")}
        s0, c0 = forward_seconds(url)
        done = threading.Event()
        bulk_time: list[float] = []

        def run_bulk() -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                bulk_time.append(timed(c, "POST", PREDICT, bulk))
            done.set()

        thread = threading.Thread(target=run_bulk)
        thread.start()
        time.sleep(0.5)  # the bulk request is parsed, tokenised and running
        busy_q, busy_r = [], []
        k = 0
        while not done.is_set():
            busy_q.append(timed(client, "POST", PREDICT, {"queries": [f"busy query {k}"]}))
            busy_r.append(timed(client, "GET", READY))
            k += 1
            time.sleep(0.05)
        thread.join()
        s1, c1 = forward_seconds(url)
    worst_q, worst_r = max(busy_q), max(busy_r)
    # Each busy query ran as a pass of its own (it never joins a bulk batch): take those out
    # to get the bulk's own micro-batch time, the unit a query may have to wait for.
    bulk_batches = max(c1 - c0 - len(busy_q), 1)
    batch_s = max(s1 - s0 - len(busy_q) * query_forward_s, 0.0) / bulk_batches
    rows += [
        f"| 3 | {bulk_n}-passage bulk request, {bulk_batches:.0f} micro-batches of {batch_s:.2f} s"
        f" | {bulk_time[0]:.1f} s | |",
        f"| 3 | short query: idle median / worst during bulk ({len(busy_q)} sent) | "
        f"{1000 * idle_q:.1f} / {1000 * worst_q:.1f} ms | **{worst_q / idle_q:.1f}x** idle, "
        f"{worst_q / batch_s:.2f} micro-batches |",
        f"| 3 | readiness probe: idle median / worst during bulk | "
        f"{1000 * idle_r:.1f} / {1000 * worst_r:.1f} ms | **{worst_r / idle_r:.1f}x** |",
    ]
    return {"query_worst_ratio": worst_q / idle_q, "ready_worst_ratio": worst_r / idle_r}


def bench_saturated(url: str, n: int) -> float:
    """Passages/s of the overload part's requests at concurrency 8 (no 429s): the yardstick."""
    bodies = [{"passages": passages(32, OVERLOAD_WORDS, f"sat{r}")} for r in range(n)]
    return 32 * n / asyncio.run(run_concurrently(url, bodies, 8))


OVERLOAD_WORDS = 8


def bench_overload(url: str, seconds: float, saturated: float, rows: list[str]) -> dict[str, float]:
    statuses: dict[int, int] = {}
    accepted = 0
    retry_after: set[str] = set()

    async def client_loop(client: httpx.AsyncClient, k: int, stop: float) -> None:
        nonlocal accepted
        i = 0
        while time.perf_counter() < stop:
            r = await post(client, {"passages": passages(32, OVERLOAD_WORDS, f"c{k}r{i}")})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                accepted += 32
            elif r.status_code == 429:
                header = r.headers.get("Retry-After", "missing")
                retry_after.add(header)
                # As the openai and Baseten clients do: wait what the server asks.
                await asyncio.sleep(float(header) if header != "missing" else 1.0)
            i += 1

    async def main() -> float:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(client, k, start + seconds) for k in range(64)))
            return time.perf_counter() - start

    elapsed = asyncio.run(main())
    bad = {s: n for s, n in statuses.items() if s not in (200, 429)}
    assert not bad, f"overload answered {bad}"
    assert "missing" not in retry_after, "a 429 without Retry-After"
    rate = accepted / elapsed
    rows += [
        f"| 4 | the same 32-passage requests, concurrency 8, default queue | "
        f"{saturated:.0f} passages/s | 1.00 |",
        f"| 4 | 64 clients for {seconds:.0f} s, MAX_QUEUE_TOKENS=8192 (200: "
        f"{statuses.get(200, 0)}, 429: {statuses.get(429, 0)}, 5xx: 0) | "
        f"{rate:.0f} passages/s accepted | **{rate / saturated:.2f}** |",
    ]
    return {"overload_vs_saturated": rate / saturated}


QUERY_CLIENTS = 4


def bench_mixed(url: str, bulk_n: int, rounds: int, rows: list[str]) -> dict[str, float]:
    bulk = {"passages": passages(bulk_n, BULK_WORDS, "mixed")}

    async def run(stream: bool) -> tuple[float, list[float], int]:
        limits = httpx.Limits(max_connections=QUERY_CLIENTS + 1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            latencies: list[float] = []
            start = time.perf_counter()
            task = asyncio.create_task(post(client, bulk))

            async def query_loop(k: int) -> None:
                i = 0
                # Bounded, so that a scheduler that starves the bulk cannot hang the bench.
                while not task.done() and time.perf_counter() - start < 600:
                    t0 = time.perf_counter()
                    r = await post(client, {"queries": [f"mixed query {k} {i} about x"]})
                    assert r.status_code == 200, r.text[:300]
                    latencies.append(time.perf_counter() - t0)
                    i += 1

            if stream:
                await asyncio.sleep(0.3)  # the bulk request is tokenised and running
                await asyncio.gather(*(query_loop(k) for k in range(QUERY_CLIENTS)))
            r = await task
            assert r.status_code == 200, r.text[:300]
            return time.perf_counter() - start, latencies, r.json()["usage"]["total_tokens"]

    alone: list[float] = []
    mixed: list[float] = []
    latencies: list[float] = []
    bulk_s = bulk_passes = 0.0
    for _ in range(rounds):  # interleaved: alone, mixed, alone, mixed
        s0, c0 = forward_seconds(url)
        alone.append(asyncio.run(run(False))[0])
        s1, c1 = forward_seconds(url)
        bulk_s, bulk_passes = bulk_s + s1 - s0, bulk_passes + c1 - c0
        elapsed, lat, _ = asyncio.run(run(True))
        mixed.append(elapsed)
        latencies += lat
    t_alone, t_mixed = statistics.median(alone), statistics.median(mixed)
    fair = (1 + QUERY_CLIENTS) * t_alone
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    # The bulk's micro-batch time, from the server's own forward times of the runs alone.
    batch_s = bulk_s / max(bulk_passes, 1)
    rows += [
        f"| 5 | {bulk_n}-passage bulk request alone, {bulk_passes / rounds:.0f} passes of "
        f"{batch_s:.2f} s (median of {rounds}) | {t_alone:.1f} s | 1.00 |",
        f"| 5 | the same while {QUERY_CLIENTS} clients stream single queries ({len(latencies)} "
        f"answered) | {t_mixed:.1f} s | **{t_mixed / t_alone:.2f}x** alone; fair share "
        f"{1 + QUERY_CLIENTS}x ({fair:.0f} s) |",
        f"| 5 | those queries: p50 / p99 latency | {1000 * p50:.0f} / {1000 * p99:.0f} ms | "
        f"p99 = **{p99 / batch_s:.1f}** bulk passes |",
    ]
    return {"mixed_vs_alone": t_mixed / t_alone, "mixed_query_p99_s": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke check)")
    parser.add_argument("--only-mixed", action="store_true", help="part 5 only")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    n, bulk_n, overhead_n, overload_s = (64, 64, 40, 3.0) if args.quick else (256, 512, 200, 10.0)

    print(
        f"Serving engine benchmark on this machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or 'cpu'}, Python {platform.python_version()}, torch "
        f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}.\n"
        f"Model: embedqa layout, random weights, hidden {args.hidden}, {args.layers} layers, "
        f"fp32 on CPU, {BATCH_ENV}; real Truss server on 127.0.0.1; clients in this process."
    )
    rows = ["| part | what | measured | ratio |", "| --- | --- | --- | --- |"]
    results: dict[str, float] = {}
    env = {"DEVICE": "cpu", "DTYPE": "float32", **BATCH_ENV}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        write_tiny_embedqa(checkpoint, seed=0, hidden=args.hidden, layers=args.layers)
        servers = []
        try:
            server = TrussServer(PACKAGE, checkpoint, Path(tmp), env)
            servers.append(server)
            results |= bench_mixed(server.url, 96 if args.quick else 256, 2, rows)
            if args.only_mixed:
                print("\n".join(rows))
                return
            results |= bench_batching(server.url, n, rows)
            results |= bench_overhead(server.url, overhead_n, rows)
            results |= bench_bulk(server.url, bulk_n, results["query_forward_s"], rows)
            saturated = bench_saturated(server.url, 8 if args.quick else 24)
            server.stop()
            servers.remove(server)
            bench_truss_floor(Path(tmp), overhead_n, rows)
            small = TrussServer(PACKAGE, checkpoint, Path(tmp), {**env, "MAX_QUEUE_TOKENS": "8192"})
            servers.append(small)
            results |= bench_overload(small.url, overload_s, saturated, rows)
        finally:
            for s in servers:
                s.stop()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
