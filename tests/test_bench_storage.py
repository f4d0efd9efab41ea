"""`make bench`'s storage table runs and reports every representation (a small run: the figures
themselves are the benchmark's business, not the test's)."""

from __future__ import annotations

import subprocess
import sys

from tools.local_server import ROOT


def test_storage_bench_reports_every_representation() -> None:
    args = ["--pages", "12", "--queries", "2", "--overhead-pages", "1", "--real-pages", "1",
            "--rounds", "1"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_storage.py"), *args],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name in ("float32", "bf16", "ubinary", "pool_factor 2", "pool_factor 3"):
        assert name in rows, out
    assert rows["float32"].rstrip(" |").endswith("1.000")  # full MaxSim agrees with itself
    assert "22,020,096" in rows["float32"] and "40,960" in rows["FDE (10,240-d)"]
    assert "colpali-engine's pooler" in out
