"""Merging the step-distillation LoRAs users run with MultiTalk into the DiT (spec 9.1).

Accepted keys (everything else, e.g. `.alpha`, is ignored and counted):

* `diffusion_model.<path>.lora_down.weight` + `diffusion_model.<path>.lora_up.weight` -> `<path>.weight`
  gets `(up @ down) · scale`;
* `diffusion_model.<path>.diff_b` -> `<path>.bias` gets `diff_b · scale`;
* `diffusion_model.<path>.diff` -> `<path>.weight` gets `diff · scale`.

`<path>` is the original Wan parameter path (`blocks.3.self_attn.q`), which is also ours. Alpha is ignored
as in the reference. Arithmetic as the reference's GPU path: every LoRA tensor is cast to the parameter's
dtype (bf16 after the spec 5.2 cast), `up @ down` is computed in that dtype on `device`, multiplied by
the scale, rounded to the parameter's dtype and added in place. LoRAs are merged permanently, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from multitalk_worker.errors import CheckpointError

logger = logging.getLogger(__name__)

LORA_PREFIX = "diffusion_model."
_DOWN, _UP = ".lora_down.weight", ".lora_up.weight"
_FULL_DELTAS = {".diff_b": ".bias", ".diff": ".weight"}  # key suffix -> parameter suffix


@dataclass(frozen=True)
class LoraDelta:
    """One update of one model parameter: a low-rank pair (up, down) or a full delta."""

    target: str  # model parameter path, e.g. "blocks.0.self_attn.q.weight"
    up: Tensor | None = None  # [out, rank]
    down: Tensor | None = None  # [rank, in]
    full: Tensor | None = None  # same shape as the parameter


@dataclass(frozen=True)
class LoraMergeResult:
    applied: int  # parameters updated
    ignored_keys: int  # keys of the file that are no accepted LoRA key (alpha, other formats)


def parse_lora(tensors: Mapping[str, Tensor], *, file: str = "<memory>") -> tuple[list[LoraDelta], int]:
    """Split a LoRA state dict into parameter updates (sorted by target) and the count of ignored keys.

    Raises CheckpointError for a `lora_down` without its `lora_up` (or the reverse).
    """
    deltas: dict[str, LoraDelta] = {}
    used: set[str] = set()
    for key in tensors:
        if not key.startswith(LORA_PREFIX):
            continue
        path = key[len(LORA_PREFIX) :]
        if path.endswith(_DOWN) or path.endswith(_UP):
            base = path.removesuffix(_DOWN).removesuffix(_UP)
            down_key, up_key = f"{LORA_PREFIX}{base}{_DOWN}", f"{LORA_PREFIX}{base}{_UP}"
            if down_key not in tensors or up_key not in tensors:
                raise CheckpointError("LoRA has lora_down without lora_up or the reverse", file=file, key=key)
            deltas[f"{base}.weight"] = LoraDelta(f"{base}.weight", up=tensors[up_key], down=tensors[down_key])
            used |= {down_key, up_key}
        elif suffix := next((s for s in _FULL_DELTAS if path.endswith(s)), None):
            target = path.removesuffix(suffix) + _FULL_DELTAS[suffix]
            deltas[target] = LoraDelta(target, full=tensors[key])
            used.add(key)
    return [deltas[t] for t in sorted(deltas)], len(tensors) - len(used)


def _delta(update: LoraDelta, param: Tensor, scale: float, device: torch.device) -> Tensor:
    """The update in the parameter's dtype, computed on `device`, shaped like the parameter."""
    dtype = param.dtype
    if update.full is not None:
        delta = update.full.to(device=device, dtype=dtype) * scale
    elif update.up is not None and update.down is not None:
        up = update.up.to(device=device, dtype=dtype)
        down = update.down.to(device=device, dtype=dtype)
        delta = (up.flatten(1) @ down.flatten(1)) * scale  # conv LoRAs: [out, r, 1, ..] @ [r, in, k..]
    else:
        raise ValueError(f"the LoRA update of {update.target} has neither a full delta nor an up/down pair")
    if delta.numel() != param.numel():
        raise CheckpointError(
            f"LoRA update of shape {tuple(delta.shape)} does not fit parameter {tuple(param.shape)}",
            key=update.target,
        )
    return delta.reshape(param.shape).to(device=param.device, dtype=dtype)


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    scale: float,
    device: torch.device | str | None = None,
    file: str = "<memory>",
) -> LoraMergeResult:
    """Add the LoRA's updates into `model`'s parameters in place; returns the counts (and logs them).

    `device` is where `up @ down` is computed (default: each parameter's device). Raises CheckpointError
    when a LoRA key names a parameter the model does not have or has another size.
    """
    updates, ignored = parse_lora(tensors, file=file)
    params = dict(model.named_parameters())
    for update in updates:
        param = params.get(update.target)
        if param is None:
            raise CheckpointError(
                "LoRA updates a parameter the DiT does not have", file=file, key=update.target
            )
        param.add_(_delta(update, param, scale, torch.device(device) if device else param.device))
    logger.info(
        "LoRA %s: applied %d updates at scale %g, ignored %d keys", file, len(updates), scale, ignored
    )
    return LoraMergeResult(applied=len(updates), ignored_keys=ignored)


def merge_lora_file(
    model: nn.Module, path: str | Path, *, scale: float, device: torch.device | str | None = None
) -> LoraMergeResult:
    """Read a LoRA safetensors file and merge it into `model` (see `merge_lora`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("LoRA file not found", file=str(path))
    return merge_lora(model, load_file(str(path)), scale=scale, device=device, file=path.name)
