"""LongCat-Video-Avatar 1.5's DMD distillation LoRA (`lora/dmd_lora.safetensors`, spec §2.7), merged.

Key grammar: for the Linear at module path `blocks.3.attn.qkv` the tensors are
`lora___lorahyphen___blocks___lorahyphen___3___lorahyphen___attn___lorahyphen___qkv.<tail>`, `<tail>` one of
`lora_down.weight` [n·r, in], `lora_up.weight` [out, r] or, for a projection split in n parts,
`lora_up.blocks.{0..n−1}.weight` [out/n, r], and `alpha_scale` (0-d; the stored value is the scale, it
overrides alpha/rank). Every key must belong to a complete module whose target is a Linear of the model,
as the reference's strict load requires; anything else is a CheckpointError naming the key.

The reference adds the LoRA at run time, y = base(x) + cast(up(down(x)))·multiplier·alpha_scale, with the
down output of a split module chunked into n parts, each through its own up matrix. Merged here once:
W ← round(W + multiplier·alpha_scale·Δ) with Δ = [up₀·down₀; …; up_{n−1}·down_{n−1}] in float32 (downᵢ the
i-th r rows), one rounding to W's dtype. The same function in float32 up to rounding (parity case
lora_* of tools/parity.py); in bf16 it rounds differently from the reference's two bf16 roundings of the
LoRA term (spec §11 test 4), and it costs no extra matmuls per step. An INT8 DiT cannot take a merge.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from multitalk_worker.errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "lora___lorahyphen___"
HYPHEN = "___lorahyphen___"
_TAIL = re.compile(
    r"(?P<name>.+?)\.(?P<tail>lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<i>\d+)\.weight|alpha_scale)"
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA of the file: its target module path, down [n·r, in], the up matrices, its scale."""

    target: str
    down: Tensor
    ups: tuple[Tensor, ...]
    alpha_scale: float

    def delta(self) -> Tensor:
        """Δ [out, in] float32: the i-th up matrix times the i-th r rows of down, stacked."""
        rank = self.down.shape[0] // len(self.ups)
        downs = self.down.float().split(rank)
        return torch.cat([up.float() @ down for up, down in zip(self.ups, downs, strict=True)])


def module_path(lora_name: str) -> str:
    """A LoRA module name as the module path it targets (each `___lorahyphen___` is a dot)."""
    return lora_name.removeprefix(PREFIX).replace(HYPHEN, ".")


def parse_lora(tensors: Mapping[str, Tensor], *, file: str) -> list[LoraModule]:
    """The file's modules, sorted by target; CheckpointError for a key outside the grammar or a module
    without its down, up or alpha_scale."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _TAIL.fullmatch(key)
        if match is None or not match["name"].startswith(PREFIX):
            raise CheckpointError(
                "not a LongCat LoRA key (lora___lorahyphen___<path>.<tail>)", file=file, key=key
            )
        grouped.setdefault(match["name"], {})[match["tail"]] = value
    modules = []
    for name, parts in sorted(grouped.items()):
        blocks = sorted(
            (k for k in parts if k.startswith("lora_up.blocks.")), key=lambda k: int(k.split(".")[2])
        )
        ups = [parts[k] for k in blocks] if blocks else [parts[k] for k in ("lora_up.weight",) if k in parts]
        expected_blocks = [f"lora_up.blocks.{i}.weight" for i in range(len(blocks))]
        missing = [t for t in ("lora_down.weight", "alpha_scale") if t not in parts]
        if missing or not ups or blocks != expected_blocks or (blocks and "lora_up.weight" in parts):
            detail = (
                f"missing {', '.join(missing)}" if missing else "lora_up must be one matrix or blocks 0..n-1"
            )
            raise CheckpointError(f"incomplete LoRA module: {detail}", file=file, key=name)
        modules.append(
            LoraModule(module_path(name), parts["lora_down.weight"], tuple(ups), float(parts["alpha_scale"]))
        )
    return modules


def merge_lora(model: nn.Module, lora: Path | Mapping[str, Tensor], *, multiplier: float = 1.0) -> int:
    """Merge a DMD-style LoRA into the model's Linear weights in place; returns the modules merged.
    Shapes and targets are all checked before any weight changes."""
    file = str(lora) if isinstance(lora, Path) else "<memory>"
    tensors = load_file(str(lora)) if isinstance(lora, Path) else lora
    modules = parse_lora(tensors, file=file)
    targets = []
    for module in modules:
        try:
            layer = model.get_submodule(module.target)
        except AttributeError:
            raise CheckpointError(
                "LoRA target is not a module of the DiT", file=file, key=module.target
            ) from None
        if type(layer) is not nn.Linear:
            raise CheckpointError(
                f"LoRA target is a {type(layer).__name__}; only the float DiT's Linear layers take a merge",
                file=file, key=module.target,
            )  # fmt: skip
        rank = module.down.shape[0] // len(module.ups)
        shapes_ok = module.down.shape == (rank * len(module.ups), layer.in_features) and all(
            up.shape == (layer.out_features // len(module.ups), rank) for up in module.ups
        )
        if not shapes_ok or layer.out_features % len(module.ups):
            raise CheckpointError(
                f"LoRA shapes down {list(module.down.shape)}, up {[list(u.shape) for u in module.ups]} "
                f"do not fit Linear({layer.in_features}, {layer.out_features})",
                file=file, key=module.target,
            )  # fmt: skip
        targets.append((layer, module))
    with torch.no_grad():
        for layer, module in targets:
            delta = module.delta().to(layer.weight.device)
            merged = layer.weight.float() + (multiplier * module.alpha_scale) * delta
            layer.weight.copy_(merged.to(layer.weight.dtype))
    logger.info("merged %d LoRA modules from %s (multiplier %g)", len(targets), file, multiplier)
    return len(targets)
