"""How the networks run: DiT kernels, compilation, precision, VAE precision, merged LoRAs, offload.

Fixed when a pipeline loads. `reference` reproduces the reference implementation (the parity path);
`fast` is the single-GPU fast path measured in bench/RESULTS.md (its error against the reference path is
stated there). fp8, LoRAs and offload (low-memory mode) are explicit choices on top of either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from multitalk_worker.errors import InvalidInput, ModelLoadFailed
from multitalk_worker.models.attention import AttentionBackendUnavailable
from multitalk_worker.models.fp8 import quantize_block_linears_fp8
from multitalk_worker.models.offload import BlockOffload
from multitalk_worker.models.runtime import (
    AUTO,
    FAST_RUNTIME,
    REFERENCE_RUNTIME,
    DiTRuntime,
    compile_blocks,
    resolve_runtime,
)
from multitalk_worker.models.vae_fast import (
    FAST_VAE_RUNTIME,
    REFERENCE_VAE_RUNTIME,
    VAERuntime,
    prepare_vae,
)
from multitalk_worker.weights.loader import ModelBundle
from multitalk_worker.weights.lora import merge_lora_file


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file in the reference's key format (spec 9.1) and its scale (alpha is ignored, as there)."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class EngineOptions:
    runtime: DiTRuntime = REFERENCE_RUNTIME
    compile: bool = False  # torch.compile each DiT block (first call per shape pays the compile)
    fp8: bool = False  # float8 block linears (torchao; Hopper GPUs); a lower-quality tier
    vae: VAERuntime = REFERENCE_VAE_RUNTIME
    loras: tuple[LoraSpec, ...] = ()
    # low-memory mode: DiT and umT5 blocks stay in host memory and visit the GPU one at a time
    offload: bool = False
    # attention backends chosen at load by `resolve_engine`: None keeps the runtime's (the reference path);
    # "auto" is FlashAttention-3 on Hopper when it passes its probe, else cuDNN; a name must pass its probe
    attention: str | None = None
    # with fp8: the fp8 self-attention too (None: where it passes its probe; True: required; False: off)
    fp8_attention: bool | None = None

    def __post_init__(self) -> None:
        if self.offload and self.fp8:
            raise InvalidInput("fp8 and offload cannot be combined; choose one of them")
        if self.fp8_attention and not self.fp8:
            raise InvalidInput("fp8_attention is part of the fp8 tier; set fp8 as well")


REFERENCE_ENGINE = EngineOptions()
ENGINES: dict[str, EngineOptions] = {
    "reference": REFERENCE_ENGINE,
    "fast": EngineOptions(runtime=FAST_RUNTIME, compile=True, vae=FAST_VAE_RUNTIME, attention=AUTO),
}


def engine_options(
    name: str,
    *,
    fp8: bool = False,
    loras: tuple[LoraSpec, ...] = (),
    offload: bool = False,
    attention: str | None = None,
) -> EngineOptions:
    """The named engine with fp8, LoRAs and offload added, and `attention` (a backend name or "auto")
    in place of the engine's own choice; InvalidInput lists the accepted names."""
    if name not in ENGINES:
        raise InvalidInput(f"unknown engine {name!r}; accepted: {', '.join(ENGINES)}")
    engine = replace(ENGINES[name], fp8=fp8, loras=loras, offload=offload)
    if attention is None:
        return engine
    if attention != AUTO:
        try:
            DiTRuntime(attention_backend=attention)  # the name check of the runtime
        except ValueError as exc:
            raise InvalidInput(f"{exc}, or {AUTO!r}") from None
    return replace(engine, attention=attention)


def resolve_engine(options: EngineOptions, device: torch.device) -> EngineOptions:
    """`options` with the DiT's attention backends chosen for `device` (models/runtime.resolve_runtime):
    called once when a pipeline loads. A named backend that cannot run here is ModelLoadFailed."""
    if options.attention is None:
        return options
    fp8_attention = options.fp8_attention if options.fp8 else False
    try:
        runtime = resolve_runtime(
            options.runtime, device, attention=options.attention, fp8_attention=fp8_attention
        )
    except AttentionBackendUnavailable as exc:
        raise ModelLoadFailed(str(exc)) from None
    return replace(options, runtime=runtime, attention=runtime.attention_backend)


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH` or `PATH=SCALE` (the form of the CLI flag and of MULTITALK_LORAS entries)."""
    path, sep, scale = text.rpartition("=") if "=" in text else (text, "", "")
    try:
        return LoraSpec(Path(path), float(scale) if sep else 1.0)
    except ValueError:
        raise InvalidInput(
            f"LoRA {text!r}: the scale after '=' must be a number, e.g. lora.safetensors=1.0"
        ) from None


def prepare_bundle(bundle: ModelBundle, options: EngineOptions, device: torch.device) -> list[BlockOffload]:
    """Apply `options` to freshly loaded networks, in place: LoRAs are merged into the bf16 weights first
    (as the reference does), then offload, fp8 and compilation, which work on the merged weights.

    Without `offload` the networks are already on `device`; with it they may arrive anywhere (load them
    to the CPU) and end up on `device`, except their block stacks, which stay in host memory (returned:
    the offloaded stacks)."""
    for lora in options.loras:
        merge_lora_file(bundle.dit, lora.path, scale=lora.scale)
    offloads = place_offloaded(bundle, device) if options.offload else []
    if options.fp8:
        quantize_dit_fp8(bundle.dit)
    if options.compile:
        compile_blocks(bundle.dit)
    if options.vae != REFERENCE_VAE_RUNTIME:  # the loaders already give the reference's float32 VAE
        prepare_vae(bundle.vae, options.vae)
    return offloads


def quantize_dit_fp8(dit: nn.Module) -> None:
    """The fp8 tier's float8 block linears (models/fp8.py), with the load-time errors of the engine."""
    if next(dit.parameters()).device.type != "cuda":
        raise InvalidInput("fp8 needs a CUDA GPU with float8 matrix units (Hopper or newer)")
    try:
        quantize_block_linears_fp8(dit)
    except RuntimeError as exc:  # torchao missing: the optional `fp8` extra
        raise ModelLoadFailed(f"{exc}; install the `fp8` extra (pip install torchao)") from None


def place_offloaded(bundle: ModelBundle, device: torch.device) -> list[BlockOffload]:
    """Low-memory placement: everything on `device` except the DiT's and umT5's blocks (~94% of the
    weights), which `BlockOffload` streams in one block at a time. The audio encoder stays where it is."""
    stacks = [(bundle.dit, bundle.dit.blocks), (bundle.text_encoder, bundle.text_encoder.encoder.block)]
    # their libraries' `to` is typed as an unbound function
    return offload_stacks(
        stacks, [cast(nn.Module, bundle.image_encoder), cast(nn.Module, bundle.vae)], device
    )


def offload_stacks(
    stacks: list[tuple[nn.Module, nn.ModuleList]], others: list[nn.Module], device: torch.device
) -> list[BlockOffload]:
    """Each (network, block stack): the stack streamed by a `BlockOffload`, the rest of the network on
    `device`; every module of `others` wholly on `device`. Returns the offloads."""
    offloads = []
    for network, stack in stacks:
        offloads.append(BlockOffload(stack, device))
        stacked = {id(tensor) for tensor in [*stack.parameters(), *stack.buffers()]}
        for tensor in [*network.parameters(), *network.buffers()]:
            if id(tensor) not in stacked:
                tensor.data = tensor.data.to(device)
    for module in others:
        module.to(device)
    return offloads
