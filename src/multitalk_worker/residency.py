"""Adapter residency: one Wan base on the GPU, every audio adapter of the worker at hand.

All our models share the DiT's base; an adapter is its 8·L + 10 audio tensors (330 for the 14B DiT,
registry.py). The worker reads each adapter it serves once at start (`MULTITALK_ADAPTERS`), keeps them in
page-locked host memory (pinned when CUDA is available, plain CPU tensors otherwise) and, when a job needs
another adapter than the DiT holds, copies that one into the DiT's parameters in place
(`TalkingVideoPipeline.use_adapter`). Nothing is rebuilt: the parameters keep their storage, dtype and
device, so compiled blocks (parameters are graph inputs) and block offload (their host copies are written
too) see the new values without recompiling.

Refused at start, with the reason: fp8 with more than one adapter (the audio attention linears sit inside
the blocks and become float8 tensors, which cannot take a bf16 copy), and a merged LoRA that changes audio
tensors with more than one adapter (a swap would undo its merge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, ModelLoadFailed
from multitalk_worker.models.configs import MultiTalkConfig
from multitalk_worker.models.offload import host_copies
from multitalk_worker.registry import MODELS, Adapter, ModelName, get_model
from multitalk_worker.weights.adapters import available_adapters, is_audio_key, load_adapter_state

logger = logging.getLogger(__name__)

ALL_ADAPTERS = "all"


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter's tensors, ready to copy in: in the DiT's dtype, in host memory."""

    model: ModelName
    adapter: Adapter
    state: dict[str, torch.Tensor]
    pinned: bool
    buffer: torch.Tensor | None = None  # the one page-locked block the state's tensors are views of

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def describe(self) -> dict[str, object]:
        return {
            "model": self.model,
            "adapter": self.adapter.name,
            "file": self.adapter.file,
            "tensors": len(self.state),
            "bytes": self.nbytes,
            "pinned": self.pinned,
        }


def adapter_model(name: str) -> tuple[ModelName, Adapter]:
    """The registry model and adapter of an adapter name (names are unique across models)."""
    for spec in MODELS.values():
        for adapter in spec.adapters:
            if adapter.name == name:
                return spec.name, adapter
    accepted = ", ".join(a.name for spec in MODELS.values() for a in spec.adapters)
    raise InvalidInput(f"unknown adapter {name!r} in MULTITALK_ADAPTERS; accepted: {accepted} or all")


def wanted_adapters(setting: str, present: list[Adapter]) -> list[Adapter]:
    """The adapters `MULTITALK_ADAPTERS` asks for: `all` = every present one, else the named ones (each must
    be present)."""
    if setting.strip() == ALL_ADAPTERS:
        return list(present)
    names = [item.strip() for item in setting.split(",") if item.strip()]
    chosen = [adapter_model(name)[1] for name in dict.fromkeys(names)]
    missing = [a for a in chosen if a not in present]
    if missing:
        raise ModelLoadFailed(
            "MULTITALK_ADAPTERS names "
            + ", ".join(f"{a.name} ({a.file})" for a in missing)
            + " but the weights folder lacks the file; download it (docs/deploy.md) or drop the name"
        )
    return chosen


def pin_state(
    state: Mapping[str, torch.Tensor], *, pin: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`state` copied into one host buffer (page-locked when `pin`, with one cudaHostRegister of the exact
    size: the pinned allocator would round each tensor up to a power of two); the tensors are views of the
    buffer, returned too: keep it, the registration lives as long as the buffer object."""
    keys = list(state)
    buffer, copies = host_copies([state[k].detach().to("cpu") for k in keys], pin=pin)
    return dict(zip(keys, copies, strict=True)), buffer


class AdapterSet:
    """The resident adapters of one worker, by adapter name, and which one the DiT holds now."""

    def __init__(self, adapters: list[ResidentAdapter], current: str) -> None:
        if not adapters:
            raise ModelLoadFailed("no audio adapter to serve; check MULTITALK_ADAPTERS and the weights")
        self.adapters = {r.adapter.name: r for r in adapters}
        if current not in self.adapters:
            raise ModelLoadFailed(f"the loaded adapter {current} is not among the resident ones")
        self.current = current
        self.swaps = 0

    def names(self) -> list[str]:
        return list(self.adapters)

    def get(self, model: str, adapter: str) -> ResidentAdapter:
        """The resident adapter `adapter` of `model`; InvalidInput lists what this worker serves."""
        found = self.adapters.get(adapter)
        if found is None or found.model != model:
            served = ", ".join(f"{r.model}/{r.adapter.name}" for r in self.adapters.values())
            raise InvalidInput(
                f"this worker does not serve {model}/{adapter}; it serves {served} (MULTITALK_ADAPTERS)"
            )
        return found

    def host_bytes(self) -> int:
        return sum(r.nbytes for r in self.adapters.values())

    def describe(self) -> dict[str, object]:
        return {
            "current": self.current,
            "swaps": self.swaps,
            "host_bytes": self.host_bytes(),
            "resident": [r.describe() for r in self.adapters.values()],
        }


def load_adapter_set(
    weights: str,
    setting: str,
    config: MultiTalkConfig,
    dtype: torch.dtype,
    current: str,
) -> AdapterSet:
    """Read every adapter the worker serves into host memory (pinned when CUDA is available).

    `weights`: the model folder, or "tiny" (the tiny model's adapters, drawn as tiny.py does, seed 0)."""
    pin = torch.cuda.is_available()
    if weights == "tiny":
        from multitalk_worker.tiny import tiny_adapter_state

        present = [a for spec in MODELS.values() for a in spec.adapters]
        read = lambda a: tiny_adapter_state(0, a.name, config=config)  # noqa: E731
    else:
        present = available_adapters(Path(weights))
        read = lambda a: load_adapter_state(weights, a, config, dtype=dtype)  # noqa: E731
    resident = []
    for adapter in wanted_adapters(setting, present):
        start = time.monotonic()
        state = {k: v.to(dtype) for k, v in read(adapter).items()}
        model, _ = adapter_model(adapter.name)
        host, buffer = pin_state(state, pin=pin)
        entry = ResidentAdapter(model, adapter, host, pin, buffer)
        resident.append(entry)
        logger.info(
            "adapter %s/%s resident: %d tensors, %.2f GiB %s host memory, read in %.1f s",
            model, adapter.name, len(state), entry.nbytes / 2**30, "page-locked" if pin else "plain",
            time.monotonic() - start,
        )  # fmt: skip
    return AdapterSet(resident, current)


def check_swappable(*, adapters: int, fp8: bool, lora_targets: list[str]) -> None:
    """Refuse, at start, the combinations where copying an adapter in would be wrong."""
    if adapters <= 1:
        return
    if fp8:
        raise ModelLoadFailed(
            "MULTITALK_FP8 quantises the audio attention linears inside the blocks, so resident adapters "
            "cannot be swapped in; serve one adapter with fp8 (MULTITALK_ADAPTERS=<name>) or turn fp8 off"
        )
    audio = [key for key in lora_targets if is_audio_key(key)]
    if audio:
        raise ModelLoadFailed(
            f"a LoRA in MULTITALK_LORAS changes {len(audio)} audio-adapter tensors (first: {audio[0]}); a "
            "swap would undo its merge: serve one adapter with it (MULTITALK_ADAPTERS=<name>)"
        )


def present_adapters(settings: Settings) -> list[Adapter]:
    """The registry adapters whose file the weights folder holds (tiny: all of them)."""
    if settings.tiny_model:
        return [a for spec in MODELS.values() for a in spec.adapters]
    return available_adapters(Path(settings.weights))


def resident_adapters(settings: Settings) -> list[Adapter]:
    """The adapters this worker keeps resident (MULTITALK_ADAPTERS over the files present)."""
    return wanted_adapters(settings.adapters, present_adapters(settings))


def first_adapter(settings: Settings) -> Adapter:
    """The adapter the DiT is loaded with: MULTITALK_MODEL's first resident one, else the first resident
    (none resident: MULTITALK_MODEL's first, whose load reports the folder's problem)."""
    resident = resident_adapters(settings)
    if not resident:  # the loader then says what is wrong with the folder (config, the missing file, ...)
        return get_model(settings.default_model).adapter()
    preferred = [a for a in resident if a in get_model(settings.default_model).adapters]
    return (preferred or resident)[0]
