"""`bench/bench_gpu.py` at smoke scale on the CPU, so the GPU benchmark cannot rot: every model,
workload, attention path and section runs through the real backends and engine, and the
report holds sane figures."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu  # noqa: E402

WORKLOADS = {"query-12", "passage-128", "passage-512", "mixed-32-512", "mixed-32-512 varlen"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench_gpu.json"
    bench_gpu.main(["--smoke", "--device", "cpu", "--json", str(out)])
    return json.loads(out.read_text())


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_model_and_workload_has_a_row(report: dict) -> None:
    assert report["smoke"] is True and report["device"].startswith("CPU")
    assert report["errors"] == []
    assert [m["model"] for m in report["models"]] == list(bench_gpu.MODELS)
    for model in report["models"]:
        want = WORKLOADS | ({"page-image"} if model["model"] == "colembed-3b" else set())
        assert {r["workload"] for r in model["rows"]} == want
        for row in model["rows"]:
            assert _positive(row["embeddings_per_s"]) and _positive(row["tokens_per_s"]), row
            assert 0 <= row["padding_share"] < 1, row
            assert row["forward_passes"] >= 1 and row["tokens"] >= row["inputs"]
        assert _positive(model["query_latency_ms"])
        assert _positive(model["parameters"])


def test_equal_lengths_pad_nothing_and_mixed_lengths_do(report: dict) -> None:
    for model in report["models"]:
        rows = {r["workload"]: r for r in model["rows"]}
        assert rows["passage-512"]["padding_share"] == 0
        assert rows["mixed-32-512"]["padding_share"] > 0


def test_attention_paths_are_exact(report: dict) -> None:
    for model in report["models"]:
        paths = {(r["batch"].split(" ")[0], r["path"]) for r in model["attention"]}
        assert paths == {(b, p) for b in ("equal", "mixed") for p in bench_gpu.REFERENCE_FIRST}
        for row in model["attention"]:
            assert row["exact"], row
            assert row["max_abs_diff"] <= 1e-5 and _positive(row["ms"])
        # On the CPU the packed path runs the per-sequence loop kernel.
        assert {r["kernel"] for r in model["attention"] if r["path"] == "varlen"} == {"sdpa_loop"}
        assert set(model["fastest_exact"]) == {"equal", "mixed"}


def test_maxsim_and_long_input(report: dict) -> None:
    (row,) = report["maxsim"]
    for key in ("ours_ms", "einsum_ms", "matmul_floor_ms"):
        assert _positive(row[key]), row
    # Full-length passages: zero padding cannot matter, so both methods agree.
    assert row["max_abs_diff_full_length"] < 1e-4
    (nv,) = [m for m in report["models"] if m["model"] == "nv-embed-v2"]
    assert nv["long_input"]["finite"] and _positive(nv["long_input"]["seconds"])
