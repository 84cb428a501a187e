"""FP8 linears for the DiT blocks: an explicit lower-precision tier, never the default (spec 9.2 notes that
quantised runs are a separate quality tier).

Dynamic float8 (e4m3) quantisation of activations and weights with one scale per row (torchao's
`Float8DynamicActivationFloat8WeightConfig`), applied to the nn.Linear layers inside the transformer blocks
(self/cross/audio attention projections and the FFN: the 99.9% of linear FLOPs). Embeddings, time MLP,
audio projector and head stay in bf16/float32. Needs a GPU with FP8 matrix units (Hopper or newer) and
the `torchao` package, imported on use. The fp8 tier's self-attention is models/fp8_attention.py (FA3's
e4m3 kernel, chosen at load by runtime.resolve_runtime); PyTorch's SDPA has no FP8 kernel.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


# Linears that a model runs in float32 on float32 copies of their weights (LongCat's adaLN modulations,
# models/longcat/blocks.linear_fp32, as the reference's autocast(float32) islands): they stay as they are.
# They hold 6% of a LongCat block's weights (0.9 GB over 48 blocks) but run on one row per latent frame:
# float8 would save that memory and no time.
FP32_LINEARS = ("adaLN_modulation",)
ACTIVATION_AMAX_FLOOR = 1e-12  # the smallest row amax an activation scale is computed from


def fp8_linear_names(model: nn.Module, *, keep: tuple[str, ...] = FP32_LINEARS) -> list[str]:
    """Names of the linears `quantize_block_linears_fp8` converts: those in `model.blocks`, except the ones
    whose name contains one of `keep`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and not any(k in name for k in keep)
    ]


def quantize_block_linears_fp8(model: nn.Module, *, keep: tuple[str, ...] = FP32_LINEARS) -> int:
    """Swap the weights of every linear in `model.blocks` for float8 row-scaled tensors, in place, except
    those whose module name contains one of `keep` (default: the float32 adaLN linears).

    Returns the number of linears converted. Raises RuntimeError when torchao is not installed.
    """
    try:
        # torchao is the optional `fp8` extra, in no lock: the checker's environment does not have it
        from torchao.quantization import (  # pyright: ignore[reportMissingImports]
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise RuntimeError("FP8 linears need the torchao package, which is not installed") from exc
    names = set(fp8_linear_names(model, keep=keep))
    # set_inductor_config=False: torchao's global inductor settings made the first compiled call of the
    # full model take over five minutes (bench/RESULTS.md); inductor stays as the caller configured it.
    # activation_value_lb: an all-zero activation row (LongCat's zero-padded text tokens reach the blocks'
    # cross-attention as such rows) otherwise gets scale 0 and quantizes to 0/0 = NaN: the whole LongCat
    # forward came out NaN on an H100 (bench/bench_longcat_dit.py). Rows with any value above the bound
    # keep their scale.
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=False, activation_value_lb=ACTIVATION_AMAX_FLOOR
    )
    quantize_(model, config, filter_fn=lambda module, name: name in names)
    logger.info("converted %d block linears to float8 (per-row scales)", len(names))
    return len(names)
