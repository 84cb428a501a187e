"""How the networks run: DiT kernels, compilation, precision, VAE precision and merged LoRAs.

Fixed when a pipeline loads. `reference` reproduces the reference implementation (the parity path);
`fast` is the single-GPU fast path measured in bench/RESULTS.md (its error against the reference path is
stated there). fp8 and LoRAs are explicit choices on top of either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from multitalk_worker.errors import InvalidInput, ModelLoadFailed
from multitalk_worker.models.fp8 import quantize_block_linears_fp8
from multitalk_worker.models.runtime import FAST_RUNTIME, REFERENCE_RUNTIME, DiTRuntime, compile_blocks
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


REFERENCE_ENGINE = EngineOptions()
ENGINES: dict[str, EngineOptions] = {
    "reference": REFERENCE_ENGINE,
    "fast": EngineOptions(runtime=FAST_RUNTIME, compile=True, vae=FAST_VAE_RUNTIME),
}


def engine_options(name: str, *, fp8: bool = False, loras: tuple[LoraSpec, ...] = ()) -> EngineOptions:
    """The named engine with fp8 and LoRAs added; InvalidInput lists the accepted names."""
    if name not in ENGINES:
        raise InvalidInput(f"unknown engine {name!r}; accepted: {', '.join(ENGINES)}")
    return replace(ENGINES[name], fp8=fp8, loras=loras)


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH` or `PATH=SCALE` (the form of the CLI flag and of MULTITALK_LORAS entries)."""
    path, sep, scale = text.rpartition("=") if "=" in text else (text, "", "")
    try:
        return LoraSpec(Path(path), float(scale) if sep else 1.0)
    except ValueError:
        raise InvalidInput(
            f"LoRA {text!r}: the scale after '=' must be a number, e.g. lora.safetensors=1.0"
        ) from None


def prepare_bundle(bundle: ModelBundle, options: EngineOptions) -> None:
    """Apply `options` to freshly loaded networks, in place: LoRAs are merged into the bf16 weights first
    (as the reference does), then fp8 and compilation, which work on the merged weights."""
    for lora in options.loras:
        merge_lora_file(bundle.dit, lora.path, scale=lora.scale)
    if options.fp8:
        if next(bundle.dit.parameters()).device.type != "cuda":
            raise InvalidInput("fp8 needs a CUDA GPU with float8 matrix units (Hopper or newer)")
        try:
            quantize_block_linears_fp8(bundle.dit)
        except RuntimeError as exc:  # torchao missing: the optional `fp8` extra
            raise ModelLoadFailed(f"{exc}; install the `fp8` extra (pip install torchao)") from None
    if options.compile:
        compile_blocks(bundle.dit)
    if options.vae != REFERENCE_VAE_RUNTIME:  # the loaders already give the reference's float32 VAE
        prepare_vae(bundle.vae, options.vae)
