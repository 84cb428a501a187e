"""The DMD LoRA applied at run time, as the reference applies it (spec longcat-avatar-inference.md §2.7).

A target `nn.Linear` becomes a `LoraLinear`: the same module path, the same `weight` and `bias` parameters
(the state dict does not change), plus a `LoraBranch` child whose tensors are non-persistent buffers. With
`x` the layer input:

    y = base(x) + cast_{dt_x}(up(down(cast_{dt_L}(x)))) · multiplier · alpha_scale

`dt_L` is the LoRA tensors' dtype, the DiT's dtype (the reference's `enable_loras` casts the LoRA weights
and its `alpha_scale` buffer to the model's first-parameter dtype), so in a bf16 run the LoRA term is rounded
to bf16, then multiplied by the multiplier and by alpha_scale in bf16, then added to the bf16 base output.
A projection split in `n` parts (`lora_up.blocks.{0..n-1}`) chunks the down output in `n` equal parts, each
through its own up matrix, and concatenates the results. In the float32 islands (`linear_fp32`: adaLN,
timestep MLP, final layer) the LoRA matmuls run in float32 on the bf16-rounded input, as under the
reference's CUDA autocast(float32).

`enabled` switches the branch per job (the resident pipeline serves the 8-step distilled preset with it
and the 50-step preset without it). Under `torch.compile` the flag is a Python attribute read in
`forward`, so dynamo guards on it: switching recompiles (once per state) instead of silently running the
graph traced with the other state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoraBranch(nn.Module):
    """down [n·r, in], ups n × [out/n, r], alpha_scale (0-d), all in `dtype` (non-persistent buffers)."""

    def __init__(
        self, down: Tensor, ups: list[Tensor], alpha_scale: float, multiplier: float, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.down: Tensor
        self.alpha_scale: Tensor
        self.register_buffer("down", down.to(dtype), persistent=False)
        for i, up in enumerate(ups):
            self.register_buffer(f"up{i}", up.to(dtype), persistent=False)
        self.register_buffer("alpha_scale", torch.tensor(alpha_scale, dtype=dtype), persistent=False)
        self.parts = len(ups)
        self.multiplier = multiplier
        self.enabled = False

    def ups(self) -> list[Tensor]:
        return [self.get_buffer(f"up{i}") for i in range(self.parts)]

    def forward(self, x: Tensor, compute: torch.dtype | None = None) -> Tensor:
        """The LoRA term for input `x`, in `x`'s dtype; `compute`: the matmul dtype (float32 islands)."""
        down = self.down
        dtype = compute or down.dtype
        h = F.linear(x.to(down.dtype).to(dtype), down.to(dtype))
        chunks = h.chunk(self.parts, dim=-1)
        out = torch.cat([F.linear(c, up.to(dtype)) for c, up in zip(chunks, self.ups(), strict=True)], dim=-1)
        return out.to(x.dtype) * self.multiplier * self.alpha_scale


class LoraLinear(nn.Linear):
    """An nn.Linear (its own weight and bias, same names) with a switchable LoRA branch `lora`."""

    def __init__(self, base: nn.Linear, branch: LoraBranch) -> None:
        nn.Module.__init__(self)  # no fresh weight: the base layer's parameters are taken over
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora = branch

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear.forward's parameter name
        y = F.linear(input, self.weight, self.bias)
        if self.lora.enabled:
            y = y + self.lora(input)
        return y


def lora_term_fp32(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The LoRA term of `layer` inside a float32 island (None when it has no enabled branch)."""
    if isinstance(layer, LoraLinear) and layer.lora.enabled:
        return layer.lora(x.float(), compute=torch.float32)
    return None
