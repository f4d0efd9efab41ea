"""Attention paths of the bidirectional encoders, and the padding-free (packed) kernel.

Three ways to run one micro-batch of right-padded rows through the Llama stack:

- `sdpa` (the default, everywhere): transformers' sdpa with the padded bidirectional mask; a
  batch without padding (every row the same length) runs with no mask at all, which is exact
  and lets sdpa pick its fastest (flash / memory-efficient) kernels.
- `sdpa_masked`: the padded mask always, even when nothing is padded (the reference the others
  are measured against; the benchmark's baseline).
- `varlen`: the batch's real tokens packed into one sequence with cumulative lengths, so no
  padded position costs anything, in attention or in the MLPs. The kernel is flash-attn's
  `flash_attn_varlen_func` if it imports, else torch's own `varlen_attn` (both CUDA, half
  precision), else a per-sequence sdpa loop: exact anywhere and what CPU tests check the
  packing with, but not fast.

`varlen` is opt-in (`ATTENTION=varlen`) until a GPU measurement shows it is the fastest exact one:
see the README's GPU section and `bench/bench_gpu.py`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_ENV = "ATTENTION"
ATTENTION_PATHS = ("sdpa", "sdpa_masked", "varlen")
# The name under which the packed kernel is registered with transformers' attention interface.
VARLEN_IMPLEMENTATION = "embed_varlen"

# (q, k, v, cu_seqlens, max_seqlen, scale) -> out; q (N, H, D), k/v (N, Hkv, D), out (N, H, D).
_T = torch.Tensor
VarlenKernel = Callable[[_T, _T, _T, _T, int, float], _T]


def pick_attention() -> str:
    """The `ATTENTION` setting: one of ATTENTION_PATHS (default `sdpa`); a bad value fails at
    load, naming it."""
    wanted = os.environ.get(ATTENTION_ENV, "").strip().lower() or "sdpa"
    if wanted not in ATTENTION_PATHS:
        raise ValueError(f"{ATTENTION_ENV}={wanted!r} is not one of {', '.join(ATTENTION_PATHS)}")
    return wanted


def _flash_attn_kernel() -> VarlenKernel | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, cu, max_len, scale):  # type: ignore[no-untyped-def]
        # flash-attn takes grouped key/value heads as they are.
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=False
        )

    return run


def _torch_varlen_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # The signature moved between torch releases (2.10 has `is_causal`, 2.13 `window_size`,
    # `scale` and `enable_gqa`): pass only what this torch knows, and repeat grouped key/value
    # heads ourselves where it cannot.
    has_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def run(q, k, v, cu, max_len, scale):  # type: ignore[no-untyped-def]
        kwargs = {}
        if q.shape[1] != k.shape[1]:
            if has_gqa:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        if has_scale:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-9:
            raise RuntimeError("this torch's varlen_attn has no `scale` and it is not 1/sqrt(d)")
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)

    return run


def loop_kernel(q, k, v, cu, max_len, scale):  # type: ignore[no-untyped-def]
    """Exact on any device: plain sdpa over each packed sequence in turn (no mask needed)."""
    del max_len
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if ks.shape[0] != qs.shape[0]:
            ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], dim=0)
            vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


@cache
def _fast_kernel() -> tuple[str, VarlenKernel | None]:
    for name, make in (("flash_attn", _flash_attn_kernel), ("torch_varlen", _torch_varlen_kernel)):
        kernel = make()
        if kernel is not None:
            return name, kernel
    return "none", None


# Why the fast kernel was given up, if it failed once (e.g. a torch build without it for this
# GPU); the packed path then keeps working on the exact loop, and the benchmark says so.
FAST_KERNEL_ERROR: str | None = None


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> tuple[str, VarlenKernel]:
    """The packed kernel for tensors on `device` in `dtype`, with its name (for the bench)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not FAST_KERNEL_ERROR:
        name, kernel = _fast_kernel()
        if kernel is not None:
            return name, kernel
    return "sdpa_loop", loop_kernel


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; query (1, H, N, D) is one packed row, whose
    sequence boundaries `cu_seqlens` (int32, len B+1) the encoder passes down the layers."""
    if cu_seqlens is None:
        # Not packed (a custom 4D mask, or no mask): exactly transformers' sdpa, whose mask
        # format `register` gave this implementation too.
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    scale = float(scaling if scaling is not None else q.shape[-1] ** -0.5)
    global FAST_KERNEL_ERROR
    name, kernel = varlen_kernel(q.device, q.dtype)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, scale)
    try:
        out = kernel(*args)
    except RuntimeError as e:
        if kernel is loop_kernel:
            raise
        FAST_KERNEL_ERROR = f"{name}: {e}".splitlines()[0][:300]
        log.warning("packed attention kernel failed, using the exact loop: %s", FAST_KERNEL_ERROR)
        out = loop_kernel(*args)
    return out.unsqueeze(0), None  # (1, N, H, D), as transformers' sdpa returns it


def register() -> None:
    """Make `embed_varlen` a transformers attention implementation (idempotent). Its masks are
    sdpa's: the packed path builds none, and anything not packed runs as sdpa would."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def pack(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For a right-padded (B, T) mask: the kept positions (bool), their position ids (N,), the
    cumulative lengths (B+1,) int32 and the longest row."""
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    # Right padding: a real token's position is its index in the row, as in the padded path.
    positions = (keep.cumsum(dim=1) - 1)[keep]
    return keep, positions, cu, int(lengths.max())
