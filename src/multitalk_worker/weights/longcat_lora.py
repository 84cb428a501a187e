"""LongCat-Video-Avatar 1.5's DMD distillation LoRA (`lora/dmd_lora.safetensors`, spec §2.7), read strictly
and attached at run time (models/longcat/lora.py), as the reference applies it: not merged.

Key grammar: for the Linear at module path `blocks.3.attn.qkv` the tensors are
`lora___lorahyphen___blocks___lorahyphen___3___lorahyphen___attn___lorahyphen___qkv.<tail>`, `<tail>` one of
`lora_down.weight` [n·r, in], `lora_up.weight` [out, r] or, for a projection split in n parts,
`lora_up.blocks.{0..n−1}.weight` [out/n, r], and `alpha_scale` (0-d; the stored value is the scale, it
overrides alpha/rank). Every key must belong to a complete module whose target is a Linear of the model,
as the reference's strict load requires; anything else is a CheckpointError naming the key.

Why at run time and not merged once: one resident pipeline serves both 1.5 presets, the distilled 8 steps
(LoRA on) and the 50-step schedule (LoRA off), so the LoRA is switched per job (`LoraSwitch.enabled`); a
merge would have to be undone, and in bf16 it rounds differently from the reference's two bf16 roundings
of the LoRA term (spec §11 test 4). The cost: two thin matmuls (rank 128) per target Linear per call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from multitalk_worker.errors import CheckpointError
from multitalk_worker.models.longcat.lora import LoraBranch, LoraLinear

logger = logging.getLogger(__name__)

LORA_FILE = "lora/dmd_lora.safetensors"  # under the 1.5 model folder
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


class LoraSwitch:
    """The DMD LoRA attached to a DiT (one `LoraBranch` per target), off until `enabled` is set; the
    pipeline sets it per job (on for the distilled schedule only)."""

    def __init__(self, branches: list[LoraBranch], file: str) -> None:
        self.branches = branches
        self.file = file

    def __len__(self) -> int:
        return len(self.branches)

    @property
    def enabled(self) -> bool:
        return bool(self.branches) and self.branches[0].enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        for branch in self.branches:
            branch.enabled = on


def attach_lora(
    model: nn.Module, lora: Path | Mapping[str, Tensor], *, multiplier: float = 1.0
) -> LoraSwitch:
    """Attach a DMD-style LoRA to the model's Linear layers at run time (disabled until switched on);
    the LoRA tensors take the DiT's dtype (its first parameter's, as the reference's `enable_loras`).
    Every target and shape is checked before any layer is replaced."""
    file = str(lora) if isinstance(lora, Path) else "<memory>"
    tensors = load_file(str(lora)) if isinstance(lora, Path) else lora
    modules = parse_lora(tensors, file=file)
    dtype = next(model.parameters()).dtype
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
                f"LoRA target is a {type(layer).__name__}; the LoRA applies to the float DiT's Linear layers "
                "(the INT8 DiT with the LoRA is not supported yet)",
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
    branches = []
    for layer, module in targets:
        device = layer.weight.device
        branch = LoraBranch(
            module.down.to(device), [u.to(device) for u in module.ups], module.alpha_scale, multiplier, dtype
        )
        parent, _, name = module.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, LoraLinear(layer, branch))
        branches.append(branch)
    logger.info("attached %d LoRA modules from %s (multiplier %g)", len(branches), file, multiplier)
    return LoraSwitch(branches, file)
