"""Faster VAE execution for the Wan VAE (diffusers' AutoencoderKLWan): bf16 weights and activations,
channels-last 3D layout, compiled residual blocks. The reference runs the VAE in float32 with TF32
convolutions (spec 5.10, 11.12). Measured on an H100 at 448x896 (bench/RESULTS.md): bf16 + channels-last
decodes 21 latent frames in 1.88 s instead of 3.25 s at 1.6e-2 relative error (random weights);
channels-last alone is float32-exact (9e-4, TF32 level) but saves only 7%; compiling the residual blocks
takes minutes on first use, so `FAST_VAE_RUNTIME` does not compile. `vae_encode` / `vae_decode` of
models/vae.py cast their inputs to the VAE's weight dtype and return float32, so a prepared VAE is used
through them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanResidualBlock
from torch import nn


@dataclass(frozen=True)
class VAERuntime:
    """dtype of weights and activations; channels_last: channels-last 3D layout for the 5D conv weights;
    compile_blocks: torch.compile each residual block (fuses its RMS norms and SiLUs; one graph per shape);
    cudnn_benchmark: let cuDNN time its convolution algorithms on first use of each shape (process-wide
    `torch.backends.cudnn.benchmark`; the chosen algorithm may round differently)."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile_blocks: bool = False
    cudnn_benchmark: bool = False


REFERENCE_VAE_RUNTIME = VAERuntime()
FAST_VAE_RUNTIME = VAERuntime(dtype=torch.bfloat16, channels_last=True)


def prepare_vae(vae: AutoencoderKLWan, runtime: VAERuntime) -> AutoencoderKLWan:
    """Cast `vae` in place to the runtime's dtype and memory layout; returns it."""
    cast(nn.Module, vae).to(dtype=runtime.dtype)  # diffusers' `to` override is typed as an unbound function
    if runtime.channels_last:  # Module.to(memory_format=...) would also hit the 4D Conv2d weights
        for param in vae.parameters():
            if param.ndim == 5:
                param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
    if runtime.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if runtime.compile_blocks:
        for module in vae.modules():
            if isinstance(module, WanResidualBlock):
                module.compile()
    return vae
