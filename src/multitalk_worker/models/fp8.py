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


def _is_block_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("blocks.")


def quantize_block_linears_fp8(model: nn.Module) -> int:
    """Swap the weights of every linear in `model.blocks` for float8 row-scaled tensors, in place.

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
    count = sum(1 for name, module in model.named_modules() if _is_block_linear(module, name))
    # set_inductor_config=False: torchao's global inductor settings made the first compiled call of the
    # full model take over five minutes (bench/RESULTS.md); inductor stays as the caller configured it.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(model, config, filter_fn=_is_block_linear)
    logger.info("converted %d block linears to float8 (per-row scales)", count)
    return count
