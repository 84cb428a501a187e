"""Wan2.1 causal 3D VAE as diffusers' AutoencoderKLWan, with the Wan latent normalisation (spec 3.4, 6.8)."""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

from multitalk_worker.models.configs import VAEConfig


def build_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    """A Wan VAE with freshly initialised weights, in eval mode. Run it in float32 (spec 1.3)."""
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )
    return vae.eval().requires_grad_(False)


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and inverse std shaped `[1, z, 1, 1, 1]` (the reference multiplies by 1/std)."""
    z = vae.config["z_dim"]
    mean = torch.tensor(vae.config["latents_mean"], dtype=like.dtype, device=like.device).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config["latents_std"], dtype=like.dtype, device=like.device).view(1, z, 1, 1, 1)
    return mean, 1.0 / std


@torch.no_grad()
def vae_encode(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Video `[B, 3, 1+4k, H, W]` in [-1, 1] -> normalised latent mean `[B, z, 1+k, H/8, W/8]` float32.

    Uses the posterior mean (no sampling): `(mu - mean_c) * (1 / std_c)`.
    """
    weight = vae.quant_conv.weight
    mu = vae.encode(video.to(device=weight.device, dtype=weight.dtype), return_dict=False)[0].mode()
    mean, inv_std = _latent_stats(vae, mu)
    return ((mu - mean) * inv_std).float()


@torch.no_grad()
def vae_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latent `[B, z, T, h, w]` -> video `[B, 3, 1+4(T-1), 8h, 8w]` float32 clamped to [-1, 1]."""
    weight = vae.post_quant_conv.weight
    z = latents.to(device=weight.device, dtype=weight.dtype)
    mean, inv_std = _latent_stats(vae, z)
    video = vae.decode(z / inv_std + mean, return_dict=False)[0]
    return video.float().clamp(-1.0, 1.0)
