"""One attention entry point for every attention in the DiT; the backend is chosen by argument.

Layout everywhere is [B, L, H, D] (batch, tokens, heads, head dim), as in the reference model. No mask,
no dropout, non-causal: the DiT needs nothing else. Each backend returns the dtype of its inputs.
Which backend runs where is decided once at load (`probe_backend`, models/runtime.resolve_runtime).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from multitalk_worker.models.fp8_attention import fp8_attention

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


# FlashAttention-3 modules that provide `flash_attn_func` with FA3's signature, in order of preference:
# `fa3_fwd_interface` is the forward-only registry wheel `fa3-fwd` (requirements-gpu.lock),
# `flash_attn_interface` a build of Dao-AILab's hopper/ directory.
FLASH3_MODULES = ("fa3_fwd_interface", "flash_attn_interface")


class AttentionBackendUnavailable(RuntimeError):
    """A backend cannot run here (package missing, wrong GPU, failed probe); the message says why."""


def flash3_func() -> Callable[..., Tensor]:
    """FA3's `flash_attn_func` from the first importable module of FLASH3_MODULES."""
    reasons = []
    for module in FLASH3_MODULES:
        try:
            return importlib.import_module(module).flash_attn_func
        except (ImportError, OSError) as exc:  # OSError: the extension's shared libraries (libcudart)
            reasons.append(f"{module}: {type(exc).__name__}: {exc}")
    raise AttentionBackendUnavailable(
        "FlashAttention-3 is not importable (" + "; ".join(reasons) + "); install requirements-gpu.lock "
        "on a CUDA 13 build of torch, or use 'sdpa' / 'cudnn'"
    )


# The FA3 calls are custom ops so that torch.compile keeps each transformer block one graph around them:
# a plain call graph-breaks at the import in `flash3_func`, and a break inside fp8_attention's loop over
# query blocks left its quantisation eager (bench/RESULTS.md run I: 0.17 s of unfused copies per forward).
@torch.library.custom_op("multitalk::flash3", mutates_args=())
def _flash3_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    out = flash3_func()(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


@_flash3_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("multitalk::flash3_fp8", mutates_args=())
def _flash3_fp8_op(
    q8: Tensor, k8: Tensor, v8: Tensor, scale: float, dq: Tensor, dk: Tensor, dv: Tensor
) -> Tensor:
    out = flash3_func()(q8, k8, v8, softmax_scale=scale, q_descale=dq, k_descale=dk, v_descale=dv)
    return out[0] if isinstance(out, tuple) else out


@_flash3_fp8_op.register_fake
def _(q8: Tensor, k8: Tensor, v8: Tensor, scale: float, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    return torch.empty_like(q8, dtype=torch.bfloat16)  # FA3's e4m3 kernel writes bf16


def _flash3(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """FlashAttention-3 (Hopper), bf16: takes [B, L, H, D] as it is (no transposes)."""
    return _flash3_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


# Q scales per head of the fp8 tier (see fp8_attention); bench/RESULTS.md run I compares 1 and 8.
FP8_QUERY_BLOCKS = 1


def _flash3_fp8_kernel(
    q8: Tensor, k8: Tensor, v8: Tensor, scale: float, dq: Tensor, dk: Tensor, dv: Tensor
) -> Tensor:
    return _flash3_fp8_op(q8, k8, v8, scale, dq, dk, dv)


def _flash3_fp8(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """FA3's e4m3 kernel after K/V smoothing and per-block scales (models/fp8_attention.py). Lossy."""
    return fp8_attention(q, k, v, scale, kernel=_flash3_fp8_kernel, query_blocks=FP8_QUERY_BLOCKS)


# Backend name -> implementation; each has a test comparing it with "sdpa" (STYLE habit 8).
# "sdpa" lets PyTorch pick a kernel; "flash", "cudnn" and "efficient" pin one of PyTorch's kernels
# (CUDA only); "flash3" is FlashAttention-3 where that package is installed; "flash3_fp8" its fp8 kernel.
BACKENDS: dict[str, AttentionFn] = {
    "sdpa": _sdpa,
    "flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
    "cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION),
    "efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    "flash3": _flash3,
    "flash3_fp8": _flash3_fp8,
}
# Backends that round q, k, v (or the probabilities) below the model dtype: only self-attention may use
# them (DiTRuntime); the reference map, text, image and audio attentions stay exact.
LOSSY_BACKENDS = frozenset({"flash3_fp8"})
# Largest relative error against float32 attention that the load-time probe accepts.
PROBE_TOLERANCE = {"flash3_fp8": 8e-2}
PROBE_TOLERANCE_EXACT = 1e-2


def probe_backend(name: str, device: torch.device) -> float:
    """Run `name` once on `device` at a DiT-like shape and compare it with float32 attention.

    Returns the relative error; raises AttentionBackendUnavailable when the backend cannot run there or
    is off by more than its tolerance, and ValueError for an unknown name. Meant for load time, so that
    a backend that cannot run is found before the first job.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; accepted: {', '.join(sorted(BACKENDS))}")
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 384, 2, 128, generator=gen, device=device).to(dtype) for _ in range(3))
    try:
        out = BACKENDS[name](q, k, v, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except AttentionBackendUnavailable as exc:
        raise AttentionBackendUnavailable(f"attention backend {name!r}: {exc}") from exc
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # kernel refused this device/dtype
        raise AttentionBackendUnavailable(f"attention backend {name!r} failed its probe: {exc}") from exc
    ref = _sdpa(q.float(), k.float(), v.float(), None)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    limit = PROBE_TOLERANCE.get(name, PROBE_TOLERANCE_EXACT)
    if not err <= limit:  # also catches NaN
        raise AttentionBackendUnavailable(
            f"attention backend {name!r} is off by {err:.2e} against float32 attention (limit {limit:g})"
        )
    return err


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
