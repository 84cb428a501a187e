"""One attention entry point for every attention in the DiT; the backend is chosen by argument.

Layout everywhere is [B, L, H, D] (batch, tokens, heads, head dim), as in the reference model. No mask,
no dropout, non-causal: the DiT needs nothing else. Each backend returns the dtype of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor, float | None], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """PyTorch scaled_dot_product_attention (flash / memory-efficient / math kernels chosen by PyTorch)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# Backend name -> implementation. Further kernels ("flash3", "cudnn") are added here, each with a test
# comparing it with "sdpa" (STYLE habit 8).
BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa}


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
