"""The v1.5 INT8 DiT (`base_model_int8/`, spec §2.6): weight-only, per-output-channel symmetric int8.

Every nn.Linear whose name does not contain `final_layer.linear` is stored as `<name>.weight_int8` (int8
[out, in]), `<name>.weight_scale` (float32 [out]) and, with a bias, `<name>.bias` (bf16). `Int8Linear` keeps
them as stored and rebuilds its weight on every call in the input's dtype, cast(q)·cast(scale), as the
reference does: in bf16 layers that is bf16(q·bf16(s)), in the float32 islands (adaLN, timestep MLP)
q·s exactly. Dequantizing once would be a different numeric path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SKIP_PATTERNS = ("final_layer.linear",)


class Int8Linear(nn.Module):
    """A linear layer from int8 weights and float32 per-row scales (buffers, loaded as stored)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_int8: Tensor
        self.weight_scale: Tensor
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))
        self.bias: Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16))
        else:
            self.bias = None

    def weight_in(self, dtype: torch.dtype) -> Tensor:
        """cast(q)·cast(scale) [out, in] in `dtype`."""
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_in(x.dtype), bias)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The linears the INT8 checkpoint stores quantized: every nn.Linear but `final_layer.linear`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(pattern in name for pattern in SKIP_PATTERNS)
    ]


def swap_in_int8(model: nn.Module, *, device: torch.device | str = "meta") -> int:
    """Replace those linears by empty `Int8Linear` shells in place (before loading; their buffers on
    `device`, meta by default so that a 15 GB shell costs nothing); returns how many."""
    names = quantized_linear_names(model)
    with torch.device(device):
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            shell = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)
            setattr(parent, child, shell)
    return len(names)
