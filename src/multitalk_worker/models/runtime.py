"""How the DiT computes (kernels and cheaper-but-equivalent formulations), kept apart from what it computes.

`DiTRuntime` is passed to `MultiTalkTransformer.forward` / `run_blocks`. The default is the reference path
(spec 5.4–5.7 numerics: float64 RoPE, the bf16 reference map of `reference_attention_map`, PyTorch's own
SDPA kernel choice). `FAST_RUNTIME` switches every shortcut on; each shortcut has a test comparing it
with the reference path (tests/test_fast_path.py):

* `fp32_rope`: the 3D RoPE rotation in float32 on float32 tables (reference: float64). The result is
  rounded to bf16 either way, so the two differ by at most one bf16 step on rare elements.
* `fused_reference_map`: the reference map as one attention call per block with the 0/1 masks as values
  (softmax(q kᵀ)·masks is exactly Σ prob·mask), instead of an explicit [B, H, L, S] probability tensor
  rounded to bf16 at every step. Same function, fewer roundings; may flip the arg-max of tokens whose
  two person scores tie within bf16 rounding (as the reference's own compiled/eager paths do, spec 11.14).
* `attention_backend`: a name from `attention.BACKENDS` ("flash3" where FlashAttention-3 is installed) for
  every attention call: self-attention, the reference map, text, image and audio cross-attention.
* `self_attention_backend`: a different backend for self-attention alone, the one call site where a lossy
  backend (`attention.LOSSY_BACKENDS`: the fp8 tier) is allowed; `exact_self_attention_blocks` keeps the
  first N blocks exact even then. The other call sites never take a lossy backend: the reference map routes
  audio by arg-max over 0/1 masks, and the short cross-attentions cost little.

`resolve_runtime` picks the backends once at load (a capability probe on the device), so that a backend
that cannot run is found before the first job.

Model transformations that are done once rather than per call live here too: `compile_blocks`.
Measured on an H100 at 448x896x81 (bench/RESULTS.md): reference 5.18-5.26 s per two-person forward,
`FAST_RUNTIME` eager 4.64 s, `FAST_RUNTIME` + `compile_blocks` 3.24 s. On an H200 (run I, torch 2.11):
reference 4.85 s, compiled with "flash3" 2.96 s, the fp8 tier (fp8 linears + "flash3_fp8") 2.19 s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from multitalk_worker.models.attention import (
    BACKENDS,
    LOSSY_BACKENDS,
    AttentionBackendUnavailable,
    probe_backend,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiTRuntime:
    """Execution choices for one DiT call; only a lossy `self_attention_backend` changes the function
    computed beyond rounding (see module doc)."""

    attention_backend: str = "sdpa"
    fp32_rope: bool = False
    fused_reference_map: bool = False
    self_attention_backend: str | None = None  # None: attention_backend
    exact_self_attention_blocks: int = 0

    def __post_init__(self) -> None:
        accepted = ", ".join(sorted(BACKENDS))
        for name in (self.attention_backend, self.self_attention_backend):
            if name is not None and name not in BACKENDS:
                raise ValueError(f"unknown attention backend {name!r}; accepted: {accepted}")
        if self.attention_backend in LOSSY_BACKENDS:
            exact = ", ".join(sorted(set(BACKENDS) - LOSSY_BACKENDS))
            raise ValueError(
                f"attention backend {self.attention_backend!r} is lossy and may serve self-attention only "
                f"(self_attention_backend); the other attentions accept: {exact}"
            )
        if self.exact_self_attention_blocks < 0:
            raise ValueError(
                f"exact_self_attention_blocks must be >= 0, got {self.exact_self_attention_blocks}"
            )

    @property
    def self_backend(self) -> str:
        """The self-attention backend."""
        return self.self_attention_backend or self.attention_backend

    def exact(self) -> DiTRuntime:
        """This runtime with self-attention on the exact backend (the first `exact_self_attention_blocks`)."""
        return replace(self, self_attention_backend=None, exact_self_attention_blocks=0)


REFERENCE_RUNTIME = DiTRuntime()
# "sdpa": on an H100 with torch 2.11 PyTorch already picks its cuDNN kernel for these shapes (measured as
# fast as pinning "cudnn", bench/RESULTS.md), and "sdpa" also runs where cuDNN attention does not.
FAST_RUNTIME = DiTRuntime(attention_backend="sdpa", fp32_rope=True, fused_reference_map=True)


AUTO = "auto"  # resolve_runtime: FlashAttention-3 on Hopper when it passes its probe, else "sdpa" (cuDNN)


def _pick(name: str, device: torch.device, *, required: bool, fallback: str | None) -> str | None:
    """`name` if it passes its probe on `device`; otherwise `fallback` with one log line, or, when
    `required`, AttentionBackendUnavailable."""
    try:
        err = probe_backend(name, device)
    except AttentionBackendUnavailable as exc:
        if required:
            raise
        logger.info(
            "attention: %s unavailable, using %s instead (%s)", name, fallback or "the exact backend", exc
        )
        return fallback
    logger.info("attention: %s passed its probe on %s (error %.1e vs float32)", name, device, err)
    return name


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def resolve_runtime(
    runtime: DiTRuntime, device: torch.device, *, attention: str, fp8_attention: bool | None
) -> DiTRuntime:
    """`runtime` with its backends chosen for `device`, once, at load.

    attention: AUTO (FlashAttention-3 on a Hopper GPU when it imports and passes `probe_backend`, else
    "sdpa", which picks cuDNN's kernel on Hopper) or a backend name, which must pass its probe.
    fp8_attention: True requires the fp8 self-attention ("flash3_fp8"), None uses it where it passes its
    probe, False leaves self-attention exact. Raises AttentionBackendUnavailable for a named backend that
    cannot run here, ValueError for an unknown or lossy name.
    """
    if attention == AUTO and not _is_hopper(device):
        logger.info("attention: sdpa (FlashAttention-3 is for Hopper GPUs; this is %s)", _device_name(device))
        exact = "sdpa"
    elif attention == AUTO:
        exact = _pick("flash3", device, required=False, fallback="sdpa") or "sdpa"
    else:
        replace(runtime, attention_backend=attention)  # the name check (ValueError)
        exact = _pick(attention, device, required=True, fallback=None) or attention
    lossy = None
    if fp8_attention or (fp8_attention is None and exact == "flash3"):  # its kernel is FA3's
        lossy = _pick("flash3_fp8", device, required=bool(fp8_attention), fallback=None)
    return replace(runtime, attention_backend=exact, self_attention_backend=lossy)


def compile_blocks(model: nn.Module, *, exact_casts: bool = True) -> int:
    """`torch.compile` each transformer block in place (model.blocks); returns how many were compiled.

    The blocks share one code object, so dynamo compiles one graph per input shape and reuses it for
    all 40 blocks (parameters are graph inputs). The first call per shape pays the compilation.
    `exact_casts` keeps every bf16 rounding point of the eager code inside fused kernels (inductor's
    `emulate_precision_casts`); without it fused kernels keep float32 intermediates.
    """
    blocks = model.blocks
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.blocks is not an nn.ModuleList of transformer blocks")
    options = {"emulate_precision_casts": exact_casts}
    for block in blocks:
        block.compile(dynamic=False, options=options)
    logger.info("compiled %d transformer blocks (exact_casts=%s)", len(blocks), exact_casts)
    return len(blocks)
