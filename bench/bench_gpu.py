"""On-device benchmark of the real model code at the official shapes (no HTTP, no weight files).

For each model (random weights at its official shape, bf16, built directly on the device; see
bench/gpu_shapes.py), through the serving backend's own `forward` and the batching engine
(`Engine`, the deployments' micro-batch budgets):

1. throughput: embeddings/s and tokens/s for 12-token queries, 128- and 512-token passages,
   mixed-length passages (32-512 tokens) and, for colembed, page images of real page sizes
   (tiled as the server tiles them); the latency of one query on an idle engine; the peak
   device memory; the share of padded positions in the forward passes.
2. attention paths (models/attention.py): `sdpa_masked` (padded mask, the reference), `sdpa`
   (no mask when no row is padded) and `varlen` (packed, cumulative lengths) on an equal-length
   and a mixed-length batch: time per forward and the deviation from the reference. The
   fastest path whose outputs agree with the reference is named.
3. MaxSim at index scale: 1000 passages x 1024 tokens against 32 queries (32 tokens each), d =
   3072 (ColEmbed) and d = 1024 (the published flash-maxsim shape): our `maxsim_scores` vs the
   padded einsum of colpali-engine / NVIDIA's `get_scores` vs one plain matmul of the same
   size (the floor).
4. NV-Embed-v2 on one input at its 32768-token limit: time and peak memory above the weights.

Anchors printed beside the figures are published numbers, not ours. On CPU (or with --smoke)
every model, batch and shape is shrunk so the whole run takes seconds: that proves the script
works (the test suite runs it), its figures mean nothing.

Run: python bench/bench_gpu.py [--smoke] [--models embedqa-1b-v2,...] [--json out.json]
(`make bench-gpu` runs it on a bare GPU machine with wheels from wheels/gpu; see README).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_shapes import Built, build  # noqa: E402

from embed_serving import scoring  # noqa: E402
from embed_serving.backend import Prepared  # noqa: E402
from embed_serving.engine import Engine, EngineLimits  # noqa: E402
from embed_serving.models import attention  # noqa: E402

MODELS = ("embedqa-1b-v2", "nv-embed-v2", "colembed-3b")
# The deployments' defaults (config.yaml): BATCH_MAX_ITEMS, BATCH_MAX_TOKENS.
LIMITS = {
    "embedqa-1b-v2": EngineLimits(batch_max_items=64, batch_max_tokens=32768),
    "nv-embed-v2": EngineLimits(batch_max_items=64, batch_max_tokens=65536),
    "colembed-3b": EngineLimits(batch_max_items=32, batch_max_tokens=65536),
}
# Real page sizes: US Letter at 150 dpi, A4 at 200 dpi, a 16:9 slide, a half-page figure.
PAGE_SIZES = ((1275, 1650), (1654, 2339), (1920, 1080), (1200, 800))
# The reference first: every other path is compared with it.
REFERENCE_FIRST = ("sdpa_masked", "sdpa", "varlen")
ANCHORS = {
    "embedqa-1b-v2": "Baseten BEI-Bert, llama-nemotron-embed-1b-v2 on H100: 600-900 embeddings/s "
    "(published range); goal: beat it",
    "maxsim": "flash-maxsim on H100, 1000 x 1024 tokens x 1024-d: 0.85 ms vs 9.47 ms for the "
    "padded einsum (published)",
    "nv-embed-32k": "README claim: ~1.5-2 GB of activations for one 32k-token input with "
    "flash/sdpa (weights 15.7 GB in bf16)",
}


@dataclass
class Scale:
    """How much work each measurement does (full on a GPU, a sliver for --smoke)."""

    smoke: bool
    inputs: dict[str, int] = field(default_factory=dict)
    pages: int = 0
    repeats: int = 0
    latency_runs: int = 0
    attention_rows: int = 0
    attention_len: int = 0
    maxsim: tuple[int, int, int, int] = (0, 0, 0, 0)  # passages, tokens, queries, query tokens
    maxsim_dims: tuple[int, ...] = ()
    long_tokens: int = 0

    @classmethod
    def make(cls, smoke: bool) -> Scale:
        if smoke:
            return cls(
                smoke=True,
                inputs={"query-12": 16, "passage-128": 8, "passage-512": 4, "mixed-32-512": 8},
                pages=3,
                repeats=1,
                latency_runs=3,
                attention_rows=4,
                attention_len=64,
                maxsim=(12, 64, 4, 8),
                maxsim_dims=(64,),
                long_tokens=256,
            )
        return cls(
            smoke=False,
            inputs={
                "query-12": 4096,
                "passage-128": 2048,
                "passage-512": 1024,
                "mixed-32-512": 1024,
            },
            # One bulk run after the warm-up: each lasts seconds, and the whole benchmark must
            # fit in a few minutes of device time.
            repeats=1,
            pages=128,
            latency_runs=50,
            attention_rows=16,
            attention_len=512,
            maxsim=(1000, 1024, 32, 32),
            maxsim_dims=(3072, 1024),
            long_tokens=32768,
        )


# ---- device helpers --------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; returns what is allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `fn` over `repeats` runs after one warm-up run, and its last result."""
    out = fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- inputs ----------------------------------------------------------------------------------


def text_inputs(lengths: list[int], vocab: int, gen: torch.Generator) -> list[Prepared]:
    # Random ids of exactly the wanted lengths: the device does not care what they spell.
    return [Prepared(torch.randint(3, vocab, (n,), generator=gen).tolist()) for n in lengths]


def workload_lengths(workload: str, n: int, gen: torch.Generator) -> list[int]:
    if workload == "mixed-32-512":
        return torch.randint(32, 513, (n,), generator=gen).tolist()
    return [int(workload.rsplit("-", 1)[1])] * n


def page_inputs(built: Built, n: int, gen: torch.Generator) -> list[Prepared]:
    """Page images as the server prepares them: tiled by the checkpoint's rule, the prompt
    `BOS passage: <img><IMG_CONTEXT>...</img>` and a short caption."""
    from PIL import Image

    spec = built.spec
    assert spec is not None
    # The backend's own tiling (uint8 tiles, normalised on the device) where it has one.
    tile = getattr(built.backend, "tile_image", None) or spec.pixel_values
    tiled = []
    for width, height in PAGE_SIZES:
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
        tiled.append(tile(Image.fromarray(pixels.numpy())))
    out = []
    for i in range(n):
        tiles = tiled[i % len(tiled)]
        image = [spec.img_start_id] + [spec.img_context_id] * spec.image_tokens(tiles.shape[0])
        head = [128000] + torch.randint(3, built.vocab_size, (3,), generator=gen).tolist()
        text = torch.randint(3, built.vocab_size, (16,), generator=gen).tolist()
        ids = head + image + [spec.img_end_id] + text
        out.append(Prepared(ids, protected=len(head) + len(image) + 1, pixel_values=tiles))
    return out


# ---- 1. throughput through the engine ----------------------------------------------------------


@dataclass
class Row:
    model: str
    workload: str
    inputs: int
    tokens: int
    seconds: float
    embeddings_per_s: float
    tokens_per_s: float
    padding_share: float
    forward_passes: int


def run_engine(built: Built, inputs: list[Prepared], limits: EngineLimits) -> tuple[float, list]:
    """All inputs submitted at once in requests of 32 (a bulk indexing client); returns the
    wall time until the last output is on the host, and the batches' lengths."""
    batches: list[list[int]] = []
    forward = built.backend.forward

    def recording(batch: list[Prepared]) -> list[torch.Tensor]:
        batches.append([len(p.input_ids) for p in batch])
        return forward(batch)

    built.backend.forward = recording  # type: ignore[method-assign]
    engine = Engine(built.backend, limits)
    try:
        start = time.perf_counter()
        jobs = [engine.submit(inputs[i : i + 32]) for i in range(0, len(inputs), 32)]
        outputs = [out for job in jobs for out in job.future.result()]
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
        del built.backend.forward
    if not all(bool(torch.isfinite(o).all()) for o in outputs):
        raise RuntimeError(f"{built.name}: non-finite outputs")
    return elapsed, batches


def throughput(built: Built, workload: str, inputs: list[Prepared], scale: Scale) -> Row:
    limits = EngineLimits(
        batch_max_items=LIMITS[built.name].batch_max_items,
        batch_max_tokens=LIMITS[built.name].batch_max_tokens,
        max_queue_tokens=1 << 40,  # the whole workload is queued at once
    )
    run_engine(built, inputs[: min(len(inputs), 64)], limits)  # warm-up: kernels, allocator
    times, batches = [], []
    for _ in range(max(1, scale.repeats)):
        elapsed, batches = run_engine(built, inputs, limits)
        times.append(elapsed)
    seconds = statistics.median(times)
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches)
    return Row(
        model=built.name,
        workload=workload,
        inputs=len(inputs),
        tokens=real,
        seconds=seconds,
        embeddings_per_s=len(inputs) / seconds,
        tokens_per_s=real / seconds,
        padding_share=1 - real / padded,
        forward_passes=len(batches),
    )


def query_latency_ms(built: Built, scale: Scale, gen: torch.Generator) -> float:
    """One 12-token query at a time on an idle engine: median ms until its vector is on the
    host (the engine's thread hand-offs included, no HTTP)."""
    engine = Engine(built.backend, LIMITS[built.name])
    try:
        times = []
        for i in range(scale.latency_runs + 1):
            query = text_inputs([12], built.vocab_size, gen)
            start = time.perf_counter()
            engine.submit(query).future.result()
            if i:  # the first one warms up
                times.append(time.perf_counter() - start)
    finally:
        engine.close()
    return 1000 * statistics.median(times)


# ---- 2. attention paths ----------------------------------------------------------------------


@dataclass
class AttentionRow:
    model: str
    batch: str
    path: str
    kernel: str
    ms: float
    speedup: float  # vs sdpa_masked
    max_abs_diff: float
    min_cosine: float
    exact: bool


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]).float()


def attention_paths(built: Built, scale: Scale, gen: torch.Generator) -> list[AttentionRow]:
    device = built.backend.device
    n, top = scale.attention_rows, scale.attention_len
    mixed = sorted(torch.randint(top // 2, top + 1, (n,), generator=gen).tolist(), reverse=True)
    # The engine never lets a row be more than half padding, so half-to-full is the worst case.
    batches = {f"equal {n}x{top}": [top] * n, f"mixed {n}x{top // 2}-{top}": mixed}
    # Exact = the rounding of the dtype: the reference and the path differ only in kernel order.
    fp32 = built.backend.dtype == torch.float32
    tol_abs, tol_cos = (1e-5, 1 - 1e-6) if fp32 else (3e-2, 0.999)
    repeats = 1 if scale.smoke else 5  # a forward lasts milliseconds to a second: a median
    rows = []
    for label, lengths in batches.items():
        inputs = text_inputs(lengths, built.vocab_size, gen)
        reference, base_ms = None, None
        for path in REFERENCE_FIRST:
            built.backbone.set_attention(path)
            with torch.inference_mode():
                seconds, out = timed(lambda b=inputs: built.backend.forward(b), device, repeats)
            flat = _flat(out)
            if reference is None:
                reference, base_ms = flat, seconds
            diff = float((flat - reference).abs().max())
            cos = float(torch.nn.functional.cosine_similarity(flat, reference, dim=-1).min())
            kernel = built.backbone._padded_implementation
            if path == "varlen":
                kernel = attention.varlen_kernel(device, built.backend.dtype)[0]
                if attention.FAST_KERNEL_ERROR:
                    kernel += f" (fast kernel failed: {attention.FAST_KERNEL_ERROR})"
            rows.append(
                AttentionRow(
                    model=built.name,
                    batch=label,
                    path=path,
                    kernel=kernel,
                    ms=1000 * seconds,
                    speedup=base_ms / seconds,
                    max_abs_diff=diff,
                    min_cosine=cos,
                    exact=diff <= tol_abs and cos >= tol_cos,
                )
            )
    built.backbone.set_attention("sdpa")
    return rows


# ---- 3. MaxSim -------------------------------------------------------------------------------


def maxsim(scale: Scale, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(0)
    rows = [maxsim_shape(dim, scale, device, dtype, gen) for dim in scale.maxsim_dims]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def maxsim_shape(
    dim: int, scale: Scale, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> dict[str, Any]:
    n_p, p_len, n_q, q_len = scale.maxsim

    def unit(n: int) -> torch.Tensor:
        x = torch.randn(n, dim, generator=gen, device=device, dtype=dtype)
        return torch.nn.functional.normalize(x, dim=-1)

    # Passages of ragged length (half to full), as page embeddings are; queries full length.
    lengths = torch.randint(p_len // 2, p_len + 1, (n_p,), generator=gen, device=device)
    passages = [unit(int(n)) for n in lengths.tolist()]
    queries = [unit(q_len) for _ in range(n_q)]
    result: dict[str, Any] = {"shape": f"{n_p} x <={p_len} tok x {dim}-d vs {n_q} x {q_len}"}
    base = reset_peak(device)
    ours_s, ours = timed(lambda: scoring.maxsim_scores(queries, passages), device, 3)
    result["ours_ms"], result["ours_peak_mb"] = 1000 * ours_s, _mb(peak_bytes(device), base)

    def einsum() -> torch.Tensor:
        q = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)
        p = torch.nn.utils.rnn.pad_sequence(passages, batch_first=True)
        return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)

    base = reset_peak(device)
    try:
        ein_s, ein = timed(einsum, device, 3)
        result["einsum_ms"] = 1000 * ein_s
        result["einsum_peak_mb"] = _mb(peak_bytes(device), base)
        # Similarities are mixed-sign here, so zero padding changes the einsum's scores (README
        # "Known differences"); compare where it cannot matter: the full-length passages.
        full = lengths == p_len
        if bool(full.any()):
            diff = (ours.float()[:, full] - ein.float()[:, full]).abs().max()
            result["max_abs_diff_full_length"] = float(diff)
    except torch.OutOfMemoryError:
        result["einsum_ms"], result["einsum_error"] = None, "out of memory"
    flat_q, flat_p = torch.cat(queries), torch.cat(passages)
    floor_s, _ = timed(lambda: flat_q @ flat_p.T, device, 3)
    result["matmul_floor_ms"] = 1000 * floor_s
    return result


def _mb(peak: int | None, base: int) -> float | None:
    return None if peak is None else (peak - base) / 2**20


# ---- 4. NV-Embed at its limit ------------------------------------------------------------------


def long_input(built: Built, scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    device = built.backend.device
    inputs = text_inputs([scale.long_tokens], built.vocab_size, gen)
    weights = reset_peak(device)
    with torch.inference_mode():
        seconds, out = timed(lambda: built.backend.forward(inputs), device, 1 if scale.smoke else 2)
    peak = peak_bytes(device)
    return {
        "tokens": scale.long_tokens,
        "seconds": seconds,
        "weights_gb": weights / 2**30 if device.type == "cuda" else None,
        "activation_peak_gb": None if peak is None else (peak - weights) / 2**30,
        "finite": bool(torch.isfinite(out[0]).all()),
    }


# ---- the run ---------------------------------------------------------------------------------


def bench_model(name: str, scale: Scale, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    built = build(name, device, dtype, smoke=scale.smoke)
    report: dict[str, Any] = {
        "model": name,
        "parameters": built.parameters,
        "build_s": time.perf_counter() - start,
        "weights_gb": torch.cuda.memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    reset_peak(device)
    rows = []
    for workload, n in scale.inputs.items():
        # NV-Embed costs ~6x embedqa per token: half the inputs keep its run as long.
        n = max(2, n // 2) if name == "nv-embed-v2" and not scale.smoke else n
        inputs = text_inputs(workload_lengths(workload, n, gen), built.vocab_size, gen)
        rows.append(throughput(built, workload, inputs, scale))
        if workload.startswith("mixed"):
            # The same padded workload on the packed path: padding then costs nothing.
            built.backbone.set_attention("varlen")
            rows.append(throughput(built, workload + " varlen", inputs, scale))
            built.backbone.set_attention("sdpa")
    if built.spec is not None:
        rows.append(throughput(built, "page-image", page_inputs(built, scale.pages, gen), scale))
    report["rows"] = [asdict(r) for r in rows]
    report["query_latency_ms"] = query_latency_ms(built, scale, gen)
    peak = peak_bytes(device)
    report["peak_gb"] = None if peak is None else peak / 2**30
    report["attention"] = [asdict(r) for r in attention_paths(built, scale, gen)]
    if name == "nv-embed-v2":
        report["long_input"] = long_input(built, scale, gen)
    del built
    _free(device)
    return report


def fastest_exact(rows: list[dict]) -> dict[str, str]:
    """Per batch kind, the fastest path whose outputs agree with the reference."""
    best: dict[str, str] = {}
    for batch in dict.fromkeys(r["batch"].split(" ")[0] for r in rows):
        ok = [r for r in rows if r["batch"].startswith(batch) and r["exact"]]
        if ok:
            best[batch] = min(ok, key=lambda r: r["ms"])["path"]
    return best


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# bench_gpu on {report['device']} ({report['dtype']}, torch {report['torch']}"
        f"{', SMOKE scale: figures mean nothing' if report['smoke'] else ''})",
        "",
        "| model | workload | inputs | emb/s | tokens/s | padding | passes | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in report["models"]:
        for r in m["rows"]:
            lines.append(
                f"| {m['model']} | {r['workload']} | {r['inputs']} | {_f(r['embeddings_per_s'])} "
                f"| {_f(r['tokens_per_s'], 0)} | {r['padding_share']:.1%} | {r['forward_passes']} "
                f"| {_f(m['peak_gb'], 2)} |"
            )
        lines.append(
            f"| {m['model']} | one query, idle: {_f(m['query_latency_ms'], 2)} ms | | | | | | |"
        )
    lines += ["", f"Anchor: {ANCHORS['embedqa-1b-v2']}.", ""]
    lines += [
        "| model | batch | attention | kernel | ms/forward | vs masked | max abs diff | "
        "min cos | exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in report["models"]:
        for r in m["attention"]:
            lines.append(
                f"| {m['model']} | {r['batch']} | {r['path']} | {r['kernel']} | {_f(r['ms'], 2)} "
                f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {r['min_cosine']:.6f} "
                f"| {'yes' if r['exact'] else 'NO'} |"
            )
        best = ", ".join(f"{k}: {v}" for k, v in m["fastest_exact"].items())
        lines.append(f"| {m['model']} | fastest exact: {best} | | | | | | | |")
    lines += ["", "| MaxSim shape | ours ms | einsum ms | matmul floor ms | ours MB | einsum MB |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in report["maxsim"]:
        lines.append(
            f"| {r['shape']} | {_f(r['ours_ms'], 2)} | {_f(r.get('einsum_ms'), 2)} "
            f"| {_f(r['matmul_floor_ms'], 2)} | {_f(r['ours_peak_mb'], 0)} "
            f"| {_f(r.get('einsum_peak_mb'), 0)} |"
        )
    lines += ["", f"Anchor: {ANCHORS['maxsim']}.", ""]
    for m in report["models"]:
        if "long_input" in m:
            li = m["long_input"]
            lines.append(
                f"NV-Embed-v2, one {li['tokens']}-token input: {_f(li['seconds'], 3)} s, "
                f"weights {_f(li['weights_gb'], 2)} GB, activation peak "
                f"{_f(li['activation_peak_gb'], 2)} GB. {ANCHORS['nv-embed-32k']}."
            )
    for error in report.get("errors", []):
        lines.append(f"FAILED: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (default off CUDA)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip", default="", help="sections to skip: maxsim")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = args.smoke or device.type != "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # fmt: skip
    scale = Scale.make(smoke)
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "smoke": smoke,
        "models": [],
        "maxsim": [],
    }
    report["errors"] = []
    # One section failing (a model that does not fit this GPU, a kernel this torch lacks) must
    # not cost the others' figures: it is reported, and the exit status says so.
    for name in [m for m in args.models.split(",") if m]:
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            model = bench_model(name, scale, device, dtype)
        except Exception as e:
            traceback.print_exc()
            report["errors"].append(f"{name}: {e!r}"[:500])
            _free(device)
            continue
        model["fastest_exact"] = fastest_exact(model["attention"])
        report["models"].append(model)
    if "maxsim" not in args.skip:
        print("... maxsim", file=sys.stderr, flush=True)
        try:
            report["maxsim"] = maxsim(scale, device, dtype)
        except Exception as e:
            traceback.print_exc()
            report["errors"].append(f"maxsim: {e!r}"[:500])
    report["anchors"] = ANCHORS
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=_jsonable))
    if report["errors"]:
        print("\nFAILED sections:\n" + "\n".join(report["errors"]), file=sys.stderr)
        if argv is None:
            raise SystemExit(1)
    return report


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


if __name__ == "__main__":
    main()
