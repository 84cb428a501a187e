from __future__ import annotations

import torch

from multitalk_worker.models.configs import TINY
from multitalk_worker.models.vae import build_vae, vae_decode, vae_encode
from multitalk_worker.models.vae_fast import FAST_VAE_RUNTIME, REFERENCE_VAE_RUNTIME, VAERuntime, prepare_vae


def _vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vae(TINY.vae)


def test_reference_runtime_changes_nothing() -> None:
    vae = _vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    prepare_vae(vae, REFERENCE_VAE_RUNTIME)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())


def test_channels_last_only_changes_layout() -> None:
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    ref = vae_encode(_vae(), video)
    vae = prepare_vae(_vae(), VAERuntime(channels_last=True))
    conv5d = [p for p in vae.parameters() if p.ndim == 5]
    assert conv5d and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in conv5d)
    torch.testing.assert_close(vae_encode(vae, video), ref, rtol=1e-5, atol=1e-5)


def test_fast_vae_bf16_is_close_to_float32() -> None:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g)
    ref = vae_decode(_vae(), latents)
    vae = prepare_vae(_vae(), FAST_VAE_RUNTIME)
    assert vae.post_quant_conv.weight.dtype == torch.bfloat16
    out = vae_decode(vae, latents)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (1, 3, 5, 32, 32)
    assert (out - ref).norm() / ref.norm() < 5e-2
