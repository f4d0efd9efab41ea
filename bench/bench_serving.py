"""Serving overheads: response encoding and length-sorted batching, each against its naive form.

1. Encoding a multi-vector response (what ColEmbed returns: pages x ~1800 tokens x 3072 float32):
   (a) what Truss does with a plain result: `arr.tolist()` then the standard `json.dumps`,
   (b) our float path: numpy arrays straight into orjson (OPT_SERIALIZE_NUMPY), as
       `encoding.json_response` does,
   (c) our base64 path: little-endian float32 bytes, base64, inside orjson.
   Every body is decoded again with the standard `json` module (an independent parser) and
   compared with the arrays it came from.

2. Batching the same mixed-length corpus through the tiny random-weight embedqa backend:
   (a) arrival order in fixed chunks, each padded to its longest input,
   (b) `batching.plan_batches` (length-sorted, capped in items and in padded tokens).
   Both must give the same embeddings in input order.

Everything runs in this one process on the same inputs, so only the ratios are like for like;
the absolute times are this machine's.

Run: python bench/bench_serving.py [--pages 8] [--repeat 3] [--texts 256] ...
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
from embed_serving.backend import Prepared  # noqa: E402
from embed_serving.batching import padding_fraction, plan_batches  # noqa: E402
from embed_serving.encoding import encode_vector, json_response, to_numpy  # noqa: E402
from embed_serving.request import Item  # noqa: E402

MODEL = "nvidia/llama-nemoretriever-colembed-3b-v1"


def timed_interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run the contenders in turn, `repeat` rounds, so drift (thermal, other load) hits all.
    Returns the times and each contender's last output."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, last


# ---- 1. response encoding ---------------------------------------------------------------------


def make_pages(pages: int, tokens: int, dim: int, seed: int) -> list[np.ndarray]:
    """L2-normalised float32 token vectors (ColEmbed normalises in fp32), ~`tokens` per page."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pages):
        n = int(rng.integers(int(tokens * 0.9), tokens + 1))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def usage(arrays: list[np.ndarray]) -> dict[str, int]:
    n = sum(a.shape[0] for a in arrays)
    return {"prompt_tokens": n, "total_tokens": n}


def body_plain_json(arrays: list[np.ndarray]) -> bytes:
    # A plain result must be JSON-native: nested lists of Python floats, walked by `json`.
    payload = {
        "model": MODEL,
        "passage_embeddings": [a.tolist() for a in arrays],
        "usage": usage(arrays),
    }
    return json.dumps(payload).encode()


def body_orjson_float(arrays: list[np.ndarray]) -> bytes:
    # The service's float path: to_numpy -> encode_vector (identity) -> json_response.
    vectors = [to_numpy(a) for a in arrays]
    payload: dict[str, Any] = {
        "model": MODEL,
        "passage_embeddings": [encode_vector(v, "float") for v in vectors],
        "usage": usage(vectors),
    }
    return bytes(json_response(payload).body)


def body_orjson_base64(arrays: list[np.ndarray]) -> bytes:
    # The service's base64 path: shapes travel next to the flat float32 bytes.
    vectors = [to_numpy(a) for a in arrays]
    payload: dict[str, Any] = {
        "model": MODEL,
        "passage_embeddings": [encode_vector(v, "base64") for v in vectors],
        "passage_embedding_shapes": [list(v.shape) for v in vectors],
        "usage": usage(vectors),
    }
    return bytes(json_response(payload).body)


def check_decoded(name: str, body: bytes, arrays: list[np.ndarray]) -> str:
    """Decode with the standard library and compare with the source arrays."""
    data = json.loads(body)
    if name.startswith("c"):
        shapes = data["passage_embedding_shapes"]
        decoded = [
            np.frombuffer(base64.b64decode(s), dtype="<f4").reshape(shape)
            for s, shape in zip(data["passage_embeddings"], shapes, strict=True)
        ]
        exact = all(np.array_equal(d, a) for d, a in zip(decoded, arrays, strict=True))
        assert exact, f"{name}: base64 did not round-trip exactly"
        return "exact (bit-identical float32)"
    # JSON numbers come back as float64: compare in float64, then after rounding to float32.
    decoded64 = [np.asarray(v, dtype=np.float64) for v in data["passage_embeddings"]]
    worst = max(
        float(np.max(np.abs(d - a.astype(np.float64)) / np.spacing(np.abs(a))))
        for d, a in zip(decoded64, arrays, strict=True)
    )
    exact = all(
        np.array_equal(d.astype(np.float32), a) for d, a in zip(decoded64, arrays, strict=True)
    )
    assert exact and worst <= 0.5, f"{name}: decoded floats differ beyond float32 rounding"
    return f"max |err| {worst:.2f} float32 ulp; exact after rounding to float32"


def bench_encoding(args: argparse.Namespace) -> list[str]:
    arrays = make_pages(args.pages, args.page_tokens, args.dim, args.seed)
    n_floats = sum(a.size for a in arrays)
    shape = ", ".join(str(a.shape[0]) for a in arrays)
    print(
        f"\n1. Response encoding: {len(arrays)} page(s) x [{shape}] tokens x {args.dim}-d float32"
        f" = {n_floats / 1e6:.1f} M floats ({4 * n_floats / 2**20:.0f} MiB raw), "
        f"median of {args.repeat}"
    )
    fns: dict[str, Callable[[], bytes]] = {
        "a) tolist + json.dumps": lambda: body_plain_json(arrays),
        "b) orjson numpy (ours)": lambda: body_orjson_float(arrays),
        "c) orjson base64 (ours)": lambda: body_orjson_base64(arrays),
    }
    # No untimed warm-up: (a) is the slow part of the run and has nothing to warm; the last
    # timed body of each is the one sized and verified.
    times, bodies = timed_interleaved(fns, args.repeat)
    # `tolist` alone, to show how much of (a) is building Python floats before `json` starts.
    tolist_times, _ = timed_interleaved({"tolist": lambda: [a.tolist() for a in arrays]}, 3)
    base_name = "a) tolist + json.dumps"
    base_t = statistics.median(times[base_name])
    base_b = len(bodies[base_name])
    header = (
        f"{'method':<25}{'median s':>9}{'min s':>8}{'MiB':>8}{'x time':>8}{'x bytes':>8}"
        "  decodes back"
    )
    print(header)
    print("-" * (len(header) + 45))
    summary = []
    for name, body in bodies.items():
        t = statistics.median(times[name])
        check = check_decoded(name, body, arrays)
        print(
            f"{name:<25}{t:>9.3f}{min(times[name]):>8.3f}{len(body) / 2**20:>8.1f}"
            f"{t / base_t:>8.3f}{len(body) / base_b:>8.3f}  {check}"
        )
        if not name.startswith("a"):
            summary.append(
                f"  encoding {name[3:]}: {base_t / t:.1f}x faster (median; "
                f"{min(times[base_name]) / min(times[name]):.1f}x by min), "
                f"{base_b / len(body):.2f}x smaller body than tolist + json.dumps"
            )
    print(f"  (of (a), arr.tolist() alone: {statistics.median(tolist_times['tolist']):.3f} s)")
    return summary


# ---- 2. batching ------------------------------------------------------------------------------


def make_corpus(n: int, median_words: float, sigma: float, max_words: int, seed: int) -> list[str]:
    """Texts of log-normally distributed word counts (many short, a few very long), cut from
    the tiny tokenizer's own training text so they tokenise into real multi-byte tokens."""
    from embed_serving.tiny import CORPUS

    words = CORPUS.split()
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.lognormal(np.log(median_words), sigma, n), 3, max_words).astype(int)
    texts = []
    for count in counts:
        start = int(rng.integers(len(words)))
        texts.append(" ".join(words[(start + k) % len(words)] for k in range(count)))
    return texts


def run_batches(backend: Any, prepared: list[Prepared], batches: list[list[int]]) -> torch.Tensor:
    """Embeddings back in input order, as the service does it."""
    out: list[torch.Tensor | None] = [None] * len(prepared)
    with torch.inference_mode():
        for batch in batches:
            for i, vector in zip(batch, backend.forward([prepared[i] for i in batch]), strict=True):
                out[i] = vector
    assert all(v is not None for v in out), "every input gets exactly one output"
    return torch.stack([v for v in out if v is not None])


def _runner(
    backend: Any, prepared: list[Prepared], batches: list[list[int]]
) -> Callable[[], torch.Tensor]:
    return lambda: run_batches(backend, prepared, batches)


def bench_batching(args: argparse.Namespace) -> list[str]:
    from embed_serving.models.embedqa import EmbedQABackend
    from embed_serving.tiny import write_tiny_embedqa

    # The backend reads these when built. fp32 on CPU: bf16 on a GPU would differ by far more
    # than the 1e-5 the equivalence check allows. The environment can still override them.
    os.environ.setdefault("DEVICE", "cpu")
    os.environ.setdefault("DTYPE", "float32")
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_embedqa(Path(tmp), seed=args.seed)
        backend = EmbedQABackend(Path(tmp))
    texts = make_corpus(args.texts, args.median_words, args.sigma, args.max_words, args.seed)
    prepared = backend.prepare([Item(text=t) for t in texts], "passage", None)
    lengths = [len(p.input_ids) for p in prepared]
    k = args.batch_items
    plans = {
        f"a) arrival order, {k}/chunk": [
            list(range(i, min(i + k, len(lengths)))) for i in range(0, len(lengths), k)
        ],
        "b) plan_batches (ours)": plan_batches(lengths, k, args.batch_tokens),
    }
    q = np.percentile(lengths, [50, 90, 99])
    print(
        f"\n2. Batching: {len(lengths)} texts, tokens median {q[0]:.0f}, p90 {q[1]:.0f}, "
        f"p99 {q[2]:.0f}, max {max(lengths)}, total {sum(lengths)}; tiny embedqa on "
        f"{backend.device} ({backend.dtype}), {torch.get_num_threads()} torch threads, "
        f"median of {args.repeat}"
    )
    fns = {name: _runner(backend, prepared, batches) for name, batches in plans.items()}
    # Untimed first pass: warms kernels/allocator, and gives the outputs to compare.
    outputs = {name: fn() for name, fn in fns.items()}
    times, _ = timed_interleaved(fns, args.repeat)
    base_name = next(iter(plans))
    base_t = statistics.median(times[base_name])
    header = (
        f"{'method':<28}{'batches':>8}{'padded tok':>11}{'padding':>9}{'max batch tok':>14}"
        f"{'median s':>9}{'min s':>8}{'x time':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, batches in plans.items():
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        biggest = max(len(b) * max(lengths[i] for i in b) for b in batches)
        t = statistics.median(times[name])
        print(
            f"{name:<28}{len(batches):>8}{padded:>11}{padding_fraction(lengths, batches):>9.1%}"
            f"{biggest:>14}{t:>9.3f}{min(times[name]):>8.3f}{t / base_t:>8.3f}"
        )
    ours_name = "b) plan_batches (ours)"
    diff = float((outputs[base_name] - outputs[ours_name]).abs().max())
    assert diff < 1e-5, f"batching changed the embeddings: max abs diff {diff:.2e}"
    print(f"  same embeddings in input order: max abs diff {diff:.2e} (< 1e-5)")
    by_min = min(times[base_name]) / min(times[ours_name])
    return [
        f"  batching plan_batches: {base_t / statistics.median(times[ours_name]):.2f}x faster "
        f"(median; {by_min:.2f}x by min), "
        f"padding {padding_fraction(lengths, plans[base_name]):.1%} -> "
        f"{padding_fraction(lengths, plans[ours_name]):.1%}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    enc = parser.add_argument_group("1. response encoding")
    enc.add_argument(
        "--pages", type=int, default=1, help="passages in the response (8 = a typical page set)"
    )
    enc.add_argument("--page-tokens", type=int, default=1800, help="token vectors per page (max)")
    enc.add_argument("--dim", type=int, default=3072, help="vector size (ColEmbed-3B: 3072)")
    bat = parser.add_argument_group("2. batching")
    bat.add_argument("--texts", type=int, default=256, help="texts in the corpus")
    bat.add_argument("--median-words", type=float, default=40.0, help="median words per text")
    bat.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of lengths")
    bat.add_argument("--max-words", type=int, default=1500, help="longest text in words")
    bat.add_argument("--batch-items", type=int, default=32, help="items per forward pass")
    bat.add_argument(
        "--batch-tokens", type=int, default=32768, help="padded tokens per pass (BATCH_MAX_TOKENS)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["encoding", "batching"], help="leave one part out")
    args = parser.parse_args()

    print(
        "Timings below are for THIS machine only "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}); the batching part runs a tiny random-weight model on CPU,\n"
        "not the real 1B model on a GPU. Only the ratios between methods measured in this same "
        "run are meaningful.\n"
        f"Load average now: {os.getloadavg()[0]:.2f} (other work on the machine makes the "
        "timings noisy; min is the less disturbed estimate)."
    )
    started = time.perf_counter()
    summary: list[str] = []
    if args.skip != "encoding":
        summary += bench_encoding(args)
    if args.skip != "batching":
        summary += bench_batching(args)
    print("\nratios (same run, same inputs):")
    print("\n".join(summary))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
