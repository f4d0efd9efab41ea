"""The attention paths give the padded-mask reference's outputs on the golden checkpoints.

`sdpa` (mask dropped for unpadded batches) and `varlen` (packed real tokens, cumulative
lengths) must equal `sdpa_masked`. On CPU the packed path runs the per-sequence sdpa kernel, so
this checks the packing itself (positions, RoPE, boundaries, re-padding); the CUDA kernels'
exactness is checked by `bench/bench_gpu.py` on the device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embed_serving.checkpoint import load_strict, read_config
from embed_serving.models import attention
from embed_serving.models.colembed import load_colembed
from embed_serving.models.llama import BidirectionalLlama, llama_config
from embed_serving.models.nvembed import load_nvembed

CPU = torch.device("cpu")
LENGTHS = {"padded": (40, 17, 5, 33, 1), "equal": (12, 12, 12)}


def _embedqa(checkpoint: Path) -> BidirectionalLlama:
    with torch.device("meta"):
        model = BidirectionalLlama(llama_config(read_config(checkpoint), "sdpa"))
    load_strict(model, checkpoint, CPU, torch.float32)
    model.reset_rotary(CPU)
    return model.eval()


def _batch(lengths: tuple[int, ...], vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


@torch.inference_mode()
def _by_path(run, backbone: BidirectionalLlama, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for path in attention.ATTENTION_PATHS:
        backbone.set_attention(path)
        got = run()
        # Padded positions hold whatever each path leaves there; only real ones count.
        out[path] = got * mask[..., None] if got.ndim == 3 else got
    backbone.set_attention("sdpa")
    return out


@pytest.mark.parametrize("shape", sorted(LENGTHS))
def test_embedqa_paths_agree(golden: Path, shape: str) -> None:
    model = _embedqa(golden / "embedqa-1b-v2" / "checkpoint")
    ids, mask = _batch(LENGTHS[shape], model.config.vocab_size)
    out = _by_path(lambda: model(input_ids=ids, attention_mask=mask), model, mask)
    for path, got in out.items():
        diff = float((got - out["sdpa_masked"]).abs().max())
        assert diff <= 1e-5, f"{path}: max |diff| {diff}"


def test_nvembed_paths_agree(golden: Path) -> None:
    model = load_nvembed(golden / "nv-embed-v2" / "checkpoint", CPU, torch.float32)
    ids, mask = _batch(LENGTHS["padded"], model.embedding_model.config.vocab_size)
    pool = mask.clone()
    pool[:, :2] = 0
    pool[:, 0] = 1  # every row keeps at least one pooled token
    out = _by_path(lambda: model(ids, mask, pool), model.embedding_model, mask)
    for path, got in out.items():
        diff = float((got - out["sdpa_masked"]).abs().max())
        assert diff <= 1e-5, f"{path}: max |diff| {diff}"


def test_colembed_paths_agree(golden: Path) -> None:
    model, spec = load_colembed(golden / "colembed-3b" / "checkpoint", CPU, torch.float32)
    ids, mask = _batch(LENGTHS["padded"], 200)
    out = _by_path(lambda: model(ids, mask), model.backbone, mask)
    for path, got in out.items():
        diff = float((got - out["sdpa_masked"]).abs().max())
        assert diff <= 1e-5, f"{path}: max |diff| {diff}"


def test_pack_positions_and_boundaries() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    keep, positions, cu, longest = attention.pack(mask)
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert cu.tolist() == [0, 3, 4, 8] and cu.dtype == torch.int32
    assert longest == 4 and int(keep.sum()) == 8


def test_cpu_uses_the_exact_loop_kernel() -> None:
    name, kernel = attention.varlen_kernel(CPU, torch.float32)
    assert name == "sdpa_loop" and kernel is attention.loop_kernel


def test_attention_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTENTION", "varlen")
    assert attention.pick_attention() == "varlen"
    monkeypatch.setenv("ATTENTION", "flash")
    with pytest.raises(ValueError, match="ATTENTION='flash'"):
        attention.pick_attention()
    monkeypatch.delenv("ATTENTION")
    assert attention.pick_attention() == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernel_on_gpu_matches_masked(golden: Path, dtype: torch.dtype) -> None:
    # On CUDA in half precision the packed path runs flash-attn or torch's varlen_attn.
    cuda = torch.device("cuda")
    checkpoint = golden / "embedqa-1b-v2" / "checkpoint"
    with torch.device("meta"):
        model = BidirectionalLlama(llama_config(read_config(checkpoint), "sdpa"))
    load_strict(model, checkpoint, cuda, dtype)
    model.reset_rotary(cuda)
    model.eval()
    name, _ = attention.varlen_kernel(cuda, dtype)
    if name == "sdpa_loop":
        pytest.skip("neither flash-attn nor torch's varlen_attn is available here")
    ids, mask = (t.to(cuda) for t in _batch(LENGTHS["padded"], model.config.vocab_size))
    out = _by_path(lambda: model(input_ids=ids, attention_mask=mask), model, mask)
    ref = out["sdpa_masked"].float()
    got = out["varlen"].float()
    cos = torch.nn.functional.cosine_similarity(got[mask.bool()], ref[mask.bool()], dim=-1)
    # Two half-precision kernels differ by their rounding only.
    assert float(cos.min()) >= 0.999, name


def test_failing_fast_kernel_falls_back_to_the_loop(
    golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel image is available for execution on the device")

    def kernel(device: torch.device, dtype: torch.dtype):  # a CUDA machine whose kernel fails
        return ("sdpa_loop", attention.loop_kernel) if attention.FAST_KERNEL_ERROR else ("x", boom)

    monkeypatch.setattr(attention, "varlen_kernel", kernel)
    monkeypatch.setattr(attention, "FAST_KERNEL_ERROR", None)
    model = _embedqa(golden / "embedqa-1b-v2" / "checkpoint")
    ids, mask = _batch(LENGTHS["padded"], model.config.vocab_size)
    out = _by_path(lambda: model(input_ids=ids, attention_mask=mask), model, mask)
    assert float((out["varlen"] - out["sdpa_masked"]).abs().max()) <= 1e-5
    assert attention.FAST_KERNEL_ERROR.startswith("x: no kernel image")


@torch.inference_mode()
def test_custom_4d_mask_is_used_as_given_on_every_path(golden: Path) -> None:
    model = _embedqa(golden / "embedqa-1b-v2" / "checkpoint")
    ids, mask = _batch(LENGTHS["padded"], model.config.vocab_size)
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None]
    causal = causal & mask.bool()[:, None, None, :]
    out = {}
    for path in attention.ATTENTION_PATHS:
        model.set_attention(path)
        out[path] = model(input_ids=ids, attention_mask=causal) * mask[..., None]
    model.set_attention("sdpa")
    bidirectional = model(input_ids=ids, attention_mask=mask) * mask[..., None]
    for path, got in out.items():
        assert torch.allclose(got, out["sdpa"], atol=1e-5), path
    assert float((out["sdpa"] - bidirectional).abs().max()) > 0.01  # the mask did apply
