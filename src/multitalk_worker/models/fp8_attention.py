"""FP8 (e4m3) self-attention for the lossy fp8 tier: smoothing, per-block scales, then an fp8 kernel.

Two exact rewrites shrink what the 3-bit mantissa has to carry before anything is rounded (the smoothing of
SageAttention, Zhang et al. 2024):

* K smoothing: k − mean_tokens(k) per head and channel. Each query's scores all move by q·mean, a constant
  per row, and softmax is invariant to that, so the attention is unchanged; the shared offset that made
  K's range large is gone.
* V smoothing: v − mean_tokens(v), added back to the output. Each row of the softmax sums to one, so
  P(v − m) + m = P v.

Scales: one per (query block, head) for Q, one per head for the smoothed K and V, each amax / 448 (the
largest e4m3 value), float32. A query block is a run of consecutive tokens; rows of the attention are
independent, so each block is its own kernel call with its own scale. (A per-block K or V scale would need
a kernel that rescales inside the softmax sum; the FA3 fp8 kernel takes one descale per batch and head.)

The kernel is a callable so that the same arithmetic runs through FlashAttention-3's fp8 kernel on a GPU
and through `emulated_fp8_kernel` (dequantise, float32 attention) on a CPU in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# softmax(q8 k8ᵀ · scale · dq · dk) (v8 · dv), all [B, L, H, D]; descales [B, H] float32; returns bf16.
Fp8Kernel = Callable[[Tensor, Tensor, Tensor, float, Tensor, Tensor, Tensor], Tensor]


def _descale(x: Tensor) -> Tensor:
    """Per (batch, head) scale of x [B, L, H, D] float32 onto the e4m3 range: amax / 448, never zero."""
    return (x.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def _quantize(x: Tensor, descale: Tensor) -> Tensor:
    """x [B, L, H, D] float32 / descale [B, H] -> e4m3 (round to nearest; |x/descale| <= 448)."""
    return (x / descale[:, None, :, None]).to(FP8)


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    *,
    kernel: Fp8Kernel,
    smooth_k: bool = True,
    smooth_v: bool = True,
    query_blocks: int = 1,
) -> Tensor:
    """softmax(q kᵀ · scale) v through an fp8 kernel. q, k, v: [B, L, H, D]; returns q's dtype and shape.

    `smooth_k` / `smooth_v` and `query_blocks` (how many Q scales per head) are the accuracy knobs
    described in the module docstring; the defaults are the fp8 tier's.
    """
    softmax_scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf, vf = k.float(), v.float()
    if smooth_k:
        kf = kf - kf.mean(dim=1, keepdim=True)
    v_mean = vf.mean(dim=1, keepdim=True) if smooth_v else None
    if v_mean is not None:
        vf = vf - v_mean
    dk, dv = _descale(kf), _descale(vf)
    k8, v8 = _quantize(kf, dk), _quantize(vf, dv)
    outs = []
    for q_block in q.float().tensor_split(query_blocks, dim=1):
        dq = _descale(q_block)
        outs.append(kernel(_quantize(q_block, dq), k8, v8, softmax_scale, dq, dk, dv))
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if v_mean is not None:
        return (out.float() + v_mean).to(q.dtype)
    return out.to(q.dtype)


def emulated_fp8_kernel(
    q8: Tensor, k8: Tensor, v8: Tensor, scale: float, dq: Tensor, dk: Tensor, dv: Tensor
) -> Tensor:
    """The fp8 kernel's contract in float32 on any device: dequantise the e4m3 inputs, exact attention.
    (FA3 also rounds the probabilities to e4m3 before P·V; this reference does not.)"""
    q, k, v = (x.float() * d[:, None, :, None] for x, d in ((q8, dq), (k8, dk), (v8, dv)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).to(torch.bfloat16)
