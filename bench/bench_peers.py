"""Our server against a peer embedding server, side by side (`make bench-peers`).

The peer is infinity-emb (michaelfeil/infinity), installed by `make bench-peers` in its own venv
under build/peers/ (bench/peers/infinity.txt pins it; never our lock). Both serve one random
Llama-shaped checkpoint, written once here: our embedqa writer's weights and tokenizer (hidden
512, 8 layers, about 25M parameters) with a plain `model_type: llama` config.json plus the
sentence-transformers files (mean pooling, normalised), which infinity loads as a
`LlamaModel` and our embedqa package loads as its bidirectional Llama. Same weights, same
tokenizer, same pooling; only the attention mask differs (causal there, bidirectional here),
which costs the same. fp32 on this machine's CPU for both.

Both speak OpenAI's `/embeddings`; the same asyncio httpx client sends the same queries to both
(the peer gets our `query: ` prefix in the text, so both embed the same tokens). Measured, per
run, each level interleaved (us, peer; the order alternates between runs):

* single-query requests at concurrency 8, 32, 64: throughput (requests/s) and p99 latency;
* bulk: requests of 64 passages at concurrency 4: passages/s and p99;
* the CPU seconds each server used per request, from /proc.

Reported: our throughput and p99 as ratios to the peer's, per run, and their range over the
runs. The goal for single queries: throughput >= 1.2x the peer's and a lower p99, in every run.
A loaded machine makes any run noisy: the load average is printed with every run.

Run: python bench/bench_peers.py [--runs 3] [--peer-python build/peers/infinity/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]

PACKAGE = "embedqa-1b-v2"
PEER_VENV = ROOT / "build" / "peers" / "infinity"
SINGLE_LEVELS = (8, 32, 64)
BULK_ITEMS, BULK_CONCURRENCY = 64, 4
MODEL_NAME = "tiny-llama"


# ---- the shared checkpoint -------------------------------------------------------------------


def write_shared_checkpoint(out: Path, hidden: int, layers: int) -> None:
    """One directory both servers load: our embedqa writer's weights and tokenizer, a plain
    Llama config.json (our loader ignores `model_type`; transformers needs a known one), and
    sentence-transformers' module files (mean pooling over every real token, then L2
    normalisation: embedqa's pooling)."""
    from embed_serving.tiny import write_json, write_tiny_embedqa

    write_tiny_embedqa(out, seed=0, hidden=hidden, layers=layers)
    config = json.loads((out / "config.json").read_text())
    config.pop("auto_map", None)
    config.pop("pooling", None)
    config |= {"architectures": ["LlamaModel"], "model_type": "llama"}
    write_json(out / "config.json", config)
    write_json(
        out / "config_sentence_transformers.json", {"prompts": {}, "similarity_fn_name": "cosine"}
    )
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]))  # fmt: skip
    write_json(out / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})
    (out / "1_Pooling").mkdir(exist_ok=True)
    write_json(
        out / "1_Pooling" / "config.json",
        {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True,
         "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False,
         "include_prompt": True},
    )  # fmt: skip
    (out / "2_Normalize").mkdir(exist_ok=True)


# ---- servers -------------------------------------------------------------------------------


def free_port() -> int:
    from tools.local_server import free_port as port

    return port()


class Server:
    """A server process: `route` is its OpenAI embeddings path; `model` what requests name;
    `prefix` goes in front of every query text (so both servers embed the same tokens)."""

    name: str
    url: str
    route: str
    model: str
    prefix: str
    pid: int

    def cpu_seconds(self) -> float:
        """user + system CPU time of the server process (threads included), from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        raise NotImplementedError


class Ours(Server):
    def __init__(self, checkpoint: Path, tmp: Path, env: dict[str, str]) -> None:
        from tools.local_server import TrussServer

        self.name, self.route, self.model, self.prefix = "ours", "/v1/embeddings", "m", ""
        self._server = TrussServer(PACKAGE, checkpoint, tmp, env)
        self.url, self.pid = self._server.url, self._server.proc.pid

    def body(self, texts: list[str], kind: str) -> dict:
        return {"input": texts, "input_type": kind}

    def stop(self) -> None:
        self._server.stop()


class Infinity(Server):
    def __init__(
        self, python: Path, checkpoint: Path, tmp: Path, batch_size: int, env: dict[str, str]
    ) -> None:
        self.name, self.route, self.model = "infinity", "/embeddings", MODEL_NAME
        self.prefix = "query: "
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / f"infinity-{port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cli = python.parent / "infinity_emb"
        self.proc = subprocess.Popen(
            [str(cli), "v2", "--model-id", str(checkpoint), "--served-model-name", MODEL_NAME,
             "--engine", "torch", "--device", "cpu", "--dtype", "float32",
             "--batch-size", str(batch_size), "--no-bettertransformer", "--no-compile",
             "--no-model-warmup",
             "--pooling-method", "mean", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"],
            env={**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
                 "HF_HUB_OFFLINE": "1", **env},
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid = self.proc.pid
        from tools.local_server import wait_until_ok

        tail = lambda: self.log_path.read_text()[-4000:]  # noqa: E731
        if wait_until_ok(self.proc, f"{self.url}/health", 300, tail):
            return
        self.stop()
        raise RuntimeError(f"infinity not ready:\n{self.log_path.read_text()[-4000:]}")

    def body(self, texts: list[str], kind: str) -> dict:
        prefix = "query: " if kind == "query" else "passage: "
        return {"input": [prefix + t for t in texts], "model": MODEL_NAME}

    def stop(self) -> None:
        from tools.local_server import end_process

        end_process(self.proc)
        self._log.close()


# ---- load ----------------------------------------------------------------------------------


def queries(n: int, tag: str) -> list[str]:
    # ~12 tokens each with the tiny tokenizer, all distinct (no server can cache them).
    return [
        f"what is the {tag} number {i} of region {i * 7 % 13} in year {2000 + i}" for i in range(n)
    ]


def passages(n: int, tag: str, words: int = 16) -> list[str]:
    return [" ".join(f"{tag}{i}w{j}" for j in range(words - i % (words // 2))) for i in range(n)]


@dataclass
class Result:
    items_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_request: float
    latencies: list[float] = field(repr=False, default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drive(server: Server, bodies: list[dict], concurrency: int, items: int) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> None:
            async with gate:
                start = time.perf_counter()
                r = await client.post(server.route, json=body)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise RuntimeError(f"{server.name}: {r.status_code} {r.text[:300]}")
                if len(r.json()["data"]) != len(body["input"]):
                    raise RuntimeError(f"{server.name}: wrong number of embeddings")

        cpu0, start = server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall, cpu = time.perf_counter() - start, server.cpu_seconds() - cpu0
    return Result(
        items_per_s=items / wall,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * percentile(latencies, 0.99),
        cpu_s_per_request=cpu / len(bodies),
        latencies=latencies,
    )


def single(server: Server, n: int, concurrency: int, tag: str) -> Result:
    bodies = [server.body([q], "query") for q in queries(n, tag)]
    return asyncio.run(drive(server, bodies, concurrency, n))


def bulk(server: Server, requests: int, tag: str) -> Result:
    bodies = [server.body(passages(BULK_ITEMS, f"{tag}r{r}"), "passage") for r in range(requests)]
    return asyncio.run(drive(server, bodies, BULK_CONCURRENCY, requests * BULK_ITEMS))


# ---- report --------------------------------------------------------------------------------


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def report(runs: list[dict[str, dict[str, Result]]], loads: list[float]) -> tuple[list[str], dict]:
    rows = [
        "| load | ours | infinity | throughput ratio (ours / infinity) | p99 ratio "
        "(ours / infinity, < 1 is better) | CPU s per request, ours / infinity |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, dict[str, list[float]]] = {}
    for level in runs[0]:
        thr = [r[level]["ours"].items_per_s / r[level]["infinity"].items_per_s for r in runs]
        p99 = [r[level]["ours"].p99_ms / r[level]["infinity"].p99_ms for r in runs]
        cpu = [
            r[level]["ours"].cpu_s_per_request / max(r[level]["infinity"].cpu_s_per_request, 1e-9)
            for r in runs
        ]
        ours = [r[level]["ours"] for r in runs]
        peer = [r[level]["infinity"] for r in runs]
        unit = "passages/s" if level.startswith("bulk") else "req/s"
        rows.append(
            f"| {level} | {span([o.items_per_s for o in ours])} {unit}, p99 "
            f"{span([o.p99_ms for o in ours])} ms | {span([p.items_per_s for p in peer])} {unit}, "
            f"p99 {span([p.p99_ms for p in peer])} ms | **{span(thr)}** | **{span(p99)}** | "
            f"{span(cpu)} |"
        )
        summary[level] = {"throughput_ratio": thr, "p99_ratio": p99, "cpu_ratio": cpu}
    rows.append(
        f"\nLoad average (1 min) at the start of each run: {', '.join(f'{x:.2f}' for x in loads)}"
    )
    return rows, summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256, help="single-query requests per level")
    parser.add_argument("--bulk-requests", type=int, default=8)
    parser.add_argument(
        "--levels", type=lambda s: tuple(int(x) for x in s.split(",")), default=SINGLE_LEVELS,
        help="single-query concurrency levels, comma-separated",
    )  # fmt: skip
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--peer-python", type=Path, default=PEER_VENV / "bin" / "python")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for our server (repeatable), e.g. --set TORCH_THREADS=1",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench_peers.json")
    parser.add_argument("--quick", action="store_true", help="1 run, few requests: a smoke check")
    args = parser.parse_args(argv)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
    if args.runs < 1 or args.requests < 1 or not args.levels or min(args.levels) < 1:
        parser.error("--runs, --requests and every --levels value must be >= 1")
    if args.quick:
        args.runs, args.requests, args.bulk_requests = 1, 64, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.peer_python.is_file():
        raise SystemExit(f"no peer venv at {args.peer_python}: run `make bench-peers`")
    import torch

    ours_env = {"DEVICE": "cpu", "DTYPE": "float32"} | dict(s.split("=", 1) for s in args.set)
    print(
        f"Peer benchmark on this machine: {platform.machine()}, {len(os.sched_getaffinity(0))} "
        f"CPUs, Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}.\nModel: Llama-shaped, random weights, hidden "
        f"{args.hidden}, {args.layers} layers, fp32 on CPU; ours: {PACKAGE} package on its "
        f"Truss server ({ours_env}); peer: infinity-emb ({args.peer_python.parent.parent}), "
        f"torch engine, batch size 64. Both on 127.0.0.1; one client in this process."
    )
    runs: list[dict[str, dict[str, Result]]] = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = tmp / "checkpoint"
        write_shared_checkpoint(checkpoint, args.hidden, args.layers)
        servers: list[Server] = []
        try:
            servers.append(Ours(checkpoint, tmp, ours_env))
            servers.append(Infinity(args.peer_python, checkpoint, tmp, 64, {}))
            for s in servers:  # warm up: first requests pay for lazy initialisation
                single(s, 64, 8, "warm")
                bulk(s, 1, "warm")
            for run in range(args.runs):
                loads.append(os.getloadavg()[0])
                order = servers if run % 2 == 0 else servers[::-1]
                levels: dict[str, dict[str, Result]] = {}
                for c in args.levels:
                    key = f"single query, concurrency {c}"
                    levels[key] = {
                        s.name: single(s, args.requests, c, f"r{run}c{c}") for s in order
                    }
                key = f"bulk: {BULK_ITEMS} passages a request, concurrency {BULK_CONCURRENCY}"
                levels[key] = {s.name: bulk(s, args.bulk_requests, f"r{run}") for s in order}
                runs.append(levels)
                for level, by in levels.items():
                    print(
                        f"run {run + 1} {level}: "
                        + "; ".join(
                            f"{n} {r.items_per_s:.1f}/s p50 {r.p50_ms:.0f} ms p99 {r.p99_ms:.0f} ms"
                            for n, r in by.items()
                        ),
                        flush=True,
                    )
        finally:
            for s in servers:
                s.stop()
            for s in servers:
                if isinstance(s, Infinity) and s.proc.returncode not in (0, -15, None):
                    print(Path(s.log_path).read_text()[-2000:])
    rows, summary = report(runs, loads)
    print("\n".join(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"settings": ours_env, "loads": loads, "summary": summary}, indent=2)
    )
    goal = all(
        min(v["throughput_ratio"]) >= 1.2 and max(v["p99_ratio"]) < 1.0
        for k, v in summary.items()
        if k.startswith("single")
    )
    verdict = "met" if goal else "NOT met"
    print(f"goal (single queries: >= 1.2x throughput and a lower p99 in every run): {verdict}")


if __name__ == "__main__":
    main()
