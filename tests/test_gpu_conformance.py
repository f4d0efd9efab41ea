"""The golden fixtures in bfloat16 stay within the documented tolerance (bench/gpu_conformance.py,
README "GPU"): on the CPU always, on CUDA when there is one (where float32 must also reproduce
the fixtures to their own atol)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_conformance  # noqa: E402


def _check_bf16(rows: list[dict]) -> None:
    for row in rows:
        if row["dtype"] == "bfloat16":
            assert not gpu_conformance.within_tolerance(row), row


def test_bf16_within_tolerance_on_cpu(golden: Path) -> None:
    rows = gpu_conformance.run(golden, torch.device("cpu"), [torch.bfloat16])
    assert {r["model"] for r in rows} == set(gpu_conformance.MODELS)
    _check_bf16(rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_and_bf16_on_gpu(golden: Path) -> None:
    gpu_conformance.no_tf32()
    rows = gpu_conformance.run(golden, torch.device("cuda"), [torch.float32, torch.bfloat16])
    for row in rows:
        if row["dtype"] == "float32":
            atol = json.loads((golden / row["model"] / "cases.json").read_text())["atol"]
            assert row["max_abs"] <= atol, row
    _check_bf16(rows)
