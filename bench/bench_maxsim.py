"""MaxSim: our chunked, length-bucketed `maxsim_scores` vs the plain zero-padded einsum.

The baseline is the formulation colpali-engine and NVIDIA's ColEmbed code use: pad every query
and passage with zeros to the longest one, then

    torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)

which materialises all queries x passages x query tokens x passage tokens at once. Both run in
this one process on the same inputs, so the ratios are like for like.

Memory, honestly:
- "largest tensor" is computed from the shapes: the biggest single intermediate each method
  allocates (similarity block or padded float32 copy of the passages), not a measurement.
- "peak mem" is measured: on CUDA torch.cuda.max_memory_allocated() above what was allocated
  before the call; on CPU the rise of the process's peak RSS (Linux VmHWM, reset per call via
  /proc/self/clear_refs), which includes allocator overhead and freed-but-not-returned pages.

Inputs are L2-normalised token vectors sharing a common direction, so similarities are
positive as with real ColBERT-style embeddings; zero padding is then harmless and the two
methods must agree. A last, small check shows what zero padding does when similarities are
negative.

Run: python bench/bench_maxsim.py [--device cuda] [--dim 3072] [--passages 16,48] ...
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
from embed_serving import scoring  # noqa: E402

Vectors = list[torch.Tensor]


def baseline_maxsim(
    queries: Sequence[torch.Tensor], passages: Sequence[torch.Tensor]
) -> torch.Tensor:
    q = torch.nn.utils.rnn.pad_sequence(list(queries), batch_first=True, padding_value=0)
    p = torch.nn.utils.rnn.pad_sequence(list(passages), batch_first=True, padding_value=0)
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)


def make_vectors(
    lengths: Sequence[int], dim: int, common: torch.Tensor, gen: torch.Generator, device: str
) -> Vectors:
    # Noise of norm ~1 plus 0.7 x a shared unit direction: pairwise similarity ~0.33.
    out = []
    for n in lengths:
        x = torch.randn(n, dim, generator=gen) / dim**0.5 + 0.7 * common
        out.append(torch.nn.functional.normalize(x, dim=1).to(device))
    return out


def baseline_largest_bytes(queries: Vectors, passages: Vectors) -> int:
    q_len = max(q.shape[0] for q in queries)
    p_len = max(p.shape[0] for p in passages)
    dim = passages[0].shape[1]
    sim = len(queries) * q_len * len(passages) * p_len
    return 4 * max(sim, len(passages) * p_len * dim)


def ours_plan(queries: Vectors, passages: Vectors, max_elements: int) -> tuple[int, int]:
    """(largest tensor in bytes, padded passage tokens) of maxsim_scores' chunk plan.

    Mirrors its planning with the same private helper; used for reporting only.
    """
    dim = passages[0].shape[1]
    q_len = max(q.shape[0] for q in queries)
    p_len = max(p.shape[0] for p in passages)
    q_step = max(1, min(len(queries), max_elements // (q_len * max(p_len, dim))))
    lengths = [p.shape[0] for p in passages]
    largest, padded_tokens = q_step * q_len * dim, 0
    for chunk in scoring._passage_chunks(lengths, max(dim, q_step * q_len), max_elements):
        padded = len(chunk) * max(lengths[i] for i in chunk)
        padded_tokens += padded
        largest = max(largest, padded * dim, q_step * q_len * padded)
    return 4 * largest, padded_tokens


class PeakMemory:
    """Peak memory rise during a call: CUDA allocator stats, or Linux peak RSS (VmHWM)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.libc = None
        if not self.cuda:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self._reset_hwm()
            except OSError:
                self.libc = None

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    def measure(self, fn: Callable[[], torch.Tensor]) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        if self.libc is None:
            return None
        self.libc.malloc_trim(0)  # hand cached heap pages back so they are not reused unseen
        self._reset_hwm()
        before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) * 1024


def timed_interleaved(
    fns: Sequence[Callable[[], torch.Tensor]], repeat: int, device: str
) -> list[float]:
    """Median seconds per function; runs alternate so load drift hits every method alike."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def negative_similarity_check(device: str) -> tuple[float, float]:
    """Small all-negative case: |ours - brute force| and |zero-padded - brute force|."""
    gen = torch.Generator().manual_seed(7)
    queries = [torch.rand(n, 16, generator=gen).to(device) + 0.1 for n in (5, 9)]
    passages = [-torch.rand(n, 16, generator=gen).to(device) - 0.1 for n in (3, 12, 30)]
    exact = torch.tensor(
        [[float((q @ p.T).max(dim=1).values.sum()) for p in passages] for q in queries]
    )
    ours = scoring.maxsim_scores(queries, passages).cpu()
    zero_padded = baseline_maxsim(queries, passages).cpu()
    return float((ours - exact).abs().max()), float((zero_padded - exact).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=3072, help="token vector size (ColEmbed-3B)")
    parser.add_argument("--queries", type=int, default=8, help="queries per scoring call")
    parser.add_argument(
        "--passages", default="8,24,48", help="comma-separated candidate counts to score"
    )
    parser.add_argument("--query-tokens", default="20,30", help="min,max tokens per query")
    parser.add_argument("--passage-tokens", default="200,1800", help="min,max tokens per page")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--max-elements", type=int, default=2**26, help="our chunk budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = args.device
    counts = [int(c) for c in args.passages.split(",")]
    q_min, q_max = (int(x) for x in args.query_tokens.split(","))
    p_min, p_max = (int(x) for x in args.passage_tokens.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    common = torch.nn.functional.normalize(torch.randn(args.dim, generator=gen), dim=0)
    memory = PeakMemory(device)

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"dim={args.dim} queries={args.queries} query_tokens={q_min}..{q_max} "
        f"passage_tokens={p_min}..{p_max} repeat={args.repeat} fp32 inputs"
    )
    header = (
        f"{'passages':>8} {'method':<9} {'time':>10} {'largest tensor':>15} {'peak mem':>12} "
        f"{'padded/real tok':>15}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for count in counts:
        q_lens = torch.randint(q_min, q_max + 1, (args.queries,), generator=gen).tolist()
        p_lens = torch.randint(p_min, p_max + 1, (count,), generator=gen).tolist()
        queries = make_vectors(q_lens, args.dim, common, gen, device)
        passages = make_vectors(p_lens, args.dim, common, gen, device)
        real = sum(p_lens)

        def ours(q: Vectors = queries, p: Vectors = passages) -> torch.Tensor:
            return scoring.maxsim_scores(q, p, max_elements=args.max_elements)

        def base(q: Vectors = queries, p: Vectors = passages) -> torch.Tensor:
            return baseline_maxsim(q, p)

        s_ours, s_base = ours(), base()  # warm-up (allocator, BLAS threads, kernels)
        m_ours, m_base = memory.measure(ours), memory.measure(base)
        t_ours, t_base = timed_interleaved([ours, base], args.repeat, device)
        big_ours, ours_padded = ours_plan(queries, passages, args.max_elements)
        big_base = baseline_largest_bytes(queries, passages)
        rows = [
            ("ours", t_ours, big_ours, m_ours, ours_padded),
            ("baseline", t_base, big_base, m_base, count * max(p_lens)),
        ]
        for name, t, big, mem, padded in rows:
            print(
                f"{count:>8} {name:<9} {t * 1e3:>8.1f}ms {mib(big):>15} {mib(mem):>12} "
                f"{padded / real:>15.2f}"
            )
        diff = float((s_ours - s_base.float()).abs().max())
        agree = torch.allclose(s_ours, s_base.float(), rtol=1e-5, atol=1e-4)
        mem_ratio = f"{m_ours / m_base:.2f}" if m_ours is not None and m_base else "n/a"
        summary.append(
            f"{count:>8} time {t_ours / t_base:.2f}  largest tensor {big_ours / big_base:.2f}  "
            f"peak mem {mem_ratio}  max|ours-baseline|={diff:.2e}  agree={agree}"
        )

    print("\nratios ours/baseline (lower is better), and score agreement:")
    print("\n".join(summary))
    ours_err, zero_err = negative_similarity_check(device)
    print(
        "\nall-negative similarities (small case), max |score - brute force|: "
        f"ours {ours_err:.2e}, zero-padded baseline {zero_err:.2e}"
    )


if __name__ == "__main__":
    main()
