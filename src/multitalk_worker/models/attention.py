"""One attention entry point for every attention in the DiT; the backend is chosen by argument.

Layout everywhere is [B, L, H, D] (batch, tokens, heads, head dim), as in the reference model. No mask,
no dropout, non-causal: the DiT needs nothing else. Each backend returns the dtype of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[[Tensor, Tensor, Tensor, float | None], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """PyTorch scaled_dot_product_attention (flash / memory-efficient / math kernels chosen by PyTorch)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _sdpa_with(kernel: SDPBackend) -> AttentionFn:
    """SDPA restricted to one of PyTorch's kernels; raises RuntimeError where that kernel cannot run
    these inputs (device, dtype, head dim) instead of silently falling back to another."""

    def run(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        with sdpa_kernel(kernel):
            return _sdpa(q, k, v, scale)

    run.__name__ = f"_sdpa_{kernel.name.lower()}"
    return run


def _flash3(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """FlashAttention-3 (Hopper) from the `flash_attn_interface` package, imported on first use."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError as exc:
        raise RuntimeError(
            "attention backend 'flash3' needs the flash_attn_interface package (FlashAttention-3), "
            "which is not installed; use 'cudnn' or 'flash'"
        ) from exc
    out = flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


# Backend name -> implementation; each has a test comparing it with "sdpa" (STYLE habit 8).
# "sdpa" lets PyTorch pick a kernel; "flash", "cudnn" and "efficient" pin one of PyTorch's kernels
# (CUDA only); "flash3" is FlashAttention-3 where that package is installed.
BACKENDS: dict[str, AttentionFn] = {
    "sdpa": _sdpa,
    "flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
    "cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION),
    "efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    "flash3": _flash3,
}


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa", scale: float | None = None
) -> Tensor:
    """softmax(q kᵀ · scale) v per head.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; scale defaults to 1/√D. Returns [B, Lq, H, D] in q's dtype.
    Raises ValueError for an unknown backend, naming the accepted ones.
    """
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {backend!r}; accepted: {', '.join(sorted(BACKENDS))}"
        ) from None
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v of layout [B, L, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    return fn(q, k, v, scale)
