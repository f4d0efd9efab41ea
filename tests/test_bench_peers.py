"""`make bench-peers` cannot rot unnoticed: its arguments parse, and the checkpoint it shares
with the peer is one our embedqa backend serves (the peer itself is not installed by
`make test`; the benchmark needs its own venv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_peers  # noqa: E402

from embed_serving.models.embedqa import EmbedQABackend  # noqa: E402
from embed_serving.request import Item  # noqa: E402


def test_arguments() -> None:
    args = bench_peers.parse_args([])
    assert (args.runs, args.levels) == (3, (8, 32, 64))
    args = bench_peers.parse_args(["--levels", "4,16", "--set", "TORCH_THREADS=1", "--quick"])
    assert (args.levels, args.set, args.runs) == ((4, 16), ["TORCH_THREADS=1"], 1)
    for bad in (["--set", "TORCH_THREADS"], ["--levels", "0"], ["--runs", "0"]):
        with pytest.raises(SystemExit):
            bench_peers.parse_args(bad)


def test_shared_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain Llama config.json and sentence-transformers' mean pooling + normalisation, and
    our backend embeds with it (model_type is ignored by our loader)."""
    monkeypatch.setenv("DEVICE", "cpu")
    bench_peers.write_shared_checkpoint(tmp_path, hidden=32, layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaModel"])
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 32
    backend = EmbedQABackend(tmp_path)
    prepared = backend.prepare([Item(text=q) for q in bench_peers.queries(3, "t")], "query", None)
    with torch.inference_mode():
        vectors = backend.forward(prepared)
    assert len(vectors) == 3
    assert torch.allclose(torch.stack(vectors).norm(dim=-1), torch.ones(3), atol=1e-5)
