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
* `attention_backend`: a name from `attention.BACKENDS` ("flash3" where FlashAttention-3 is installed).

Model transformations that are done once rather than per call live here too: `compile_blocks`.
Measured on an H100 at 448x896x81 (bench/RESULTS.md): reference 5.18-5.26 s per two-person forward,
`FAST_RUNTIME` eager 4.64 s, `FAST_RUNTIME` + `compile_blocks` 3.24 s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from multitalk_worker.models.attention import BACKENDS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiTRuntime:
    """Execution choices for one DiT call; none of them changes the function computed (see module doc)."""

    attention_backend: str = "sdpa"
    fp32_rope: bool = False
    fused_reference_map: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend not in BACKENDS:
            accepted = ", ".join(sorted(BACKENDS))
            raise ValueError(f"unknown attention backend {self.attention_backend!r}; accepted: {accepted}")


REFERENCE_RUNTIME = DiTRuntime()
# "sdpa": on an H100 with torch 2.11 PyTorch already picks its cuDNN kernel for these shapes (measured as
# fast as pinning "cudnn", bench/RESULTS.md), and "sdpa" also runs where cuDNN attention does not.
FAST_RUNTIME = DiTRuntime(attention_backend="sdpa", fp32_rope=True, fused_reference_map=True)


def compile_blocks(model: nn.Module, *, exact_casts: bool = True) -> int:
    """`torch.compile` each transformer block in place (model.blocks); returns how many were compiled.

    The blocks share one code object, so dynamo compiles one graph per input shape and reuses it for
    all 40 blocks (parameters are graph inputs). The first call per shape pays the compilation.
    `exact_casts` keeps every bf16 rounding point of the eager code inside fused kernels (inductor's
    `emulate_precision_casts`); without it fused kernels keep float32 intermediates.
    """
    blocks = model.blocks  # type: ignore[attr-defined]
    options = {"emulate_precision_casts": exact_casts}
    for block in blocks:
        block.compile(dynamic=False, options=options)
    logger.info("compiled %d transformer blocks (exact_casts=%s)", len(blocks), exact_casts)
    return len(blocks)
