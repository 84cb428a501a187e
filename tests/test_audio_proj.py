from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multitalk_worker.models.audio_proj import AudioProjModel, split_audio_windows, vae_temporal_stride
from multitalk_worker.models.configs import TINY, DiTConfig


def _indexed_windows(frames: int, window: int = 5) -> torch.Tensor:
    """[1, F, W, 1, 1] windows whose value is the absolute audio frame j + offset (no clamping)."""
    centre = window // 2
    idx = torch.arange(frames)[:, None] + torch.arange(window)[None, :] - centre
    return idx.float()[None, :, :, None, None]


def test_split_routes_frame_zero_and_contiguous_eight_frame_runs() -> None:
    latent_frames = 4
    audio = _indexed_windows(4 * (latent_frames - 1) + 1)
    first, rest = split_audio_windows(audio, 4)
    assert first.shape == (1, 1, 5, 1, 1)
    assert rest.shape == (1, latent_frames - 1, 8, 1, 1)
    assert first.flatten().tolist() == [-2, -1, 0, 1, 2]
    for t in range(1, latent_frames):
        # latent frame t covers video frames 4t−3..4t; its run is audio frames 4t−5..4t+2
        assert rest[0, t - 1].flatten().tolist() == list(range(4 * t - 5, 4 * t + 3))


def test_split_keeps_leading_dims_and_rejects_bad_frame_count() -> None:
    audio = torch.randn(2, 3, 9, 5, 2, 4)
    first, rest = split_audio_windows(audio, 4)
    assert first.shape == (2, 3, 1, 5, 2, 4) and rest.shape == (2, 3, 2, 8, 2, 4)
    with pytest.raises(ValueError, match="video frames"):
        split_audio_windows(torch.randn(1, 8, 5, 2, 4), 4)


def test_projector_values_match_direct_formula() -> None:
    cfg = TINY.dit
    torch.manual_seed(0)
    proj = AudioProjModel(cfg)
    with torch.no_grad():
        proj.norm.weight.uniform_(0.5, 1.5)
        proj.norm.bias.uniform_(-0.5, 0.5)
    audio = torch.randn(3, 9, cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
    first, rest = split_audio_windows(audio, vae_temporal_stride(cfg))
    out = proj(first, rest)
    assert out.shape == (3, 3, cfg.audio_tokens, cfg.audio_dim)

    h0 = F.relu(F.linear(first.reshape(3, 1, -1), proj.proj1.weight, proj.proj1.bias))
    h1 = F.relu(F.linear(rest.reshape(3, 2, -1), proj.proj1_vf.weight, proj.proj1_vf.bias))
    h = F.relu(F.linear(torch.cat([h0, h1], dim=1), proj.proj2.weight, proj.proj2.bias))
    tokens = F.linear(h, proj.proj3.weight, proj.proj3.bias).reshape(3, 3, cfg.audio_tokens, cfg.audio_dim)
    expected = F.layer_norm(tokens, (cfg.audio_dim,), proj.norm.weight, proj.norm.bias, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_frame_zero_uses_proj1_only() -> None:
    cfg = TINY.dit
    torch.manual_seed(1)
    proj = AudioProjModel(cfg)
    first, rest = split_audio_windows(torch.randn(1, 9, 5, cfg.audio_layers, cfg.audio_channels), 4)
    before = proj(first, rest)
    with torch.no_grad():
        proj.proj1.weight.mul_(2.0)
    after = proj(first, rest)
    assert not torch.allclose(before[:, 0], after[:, 0])
    torch.testing.assert_close(before[:, 1:], after[:, 1:], rtol=0, atol=0)


def test_full_size_parameter_names_and_shapes() -> None:
    with torch.device("meta"):
        proj = AudioProjModel(DiTConfig())
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {
        "proj1.weight": (512, 46080),
        "proj1.bias": (512,),
        "proj1_vf.weight": (512, 73728),
        "proj1_vf.bias": (512,),
        "proj2.weight": (512, 512),
        "proj2.bias": (512,),
        "proj3.weight": (24576, 512),
        "proj3.bias": (24576,),
        "norm.weight": (768,),
        "norm.bias": (768,),
    }
    assert vae_temporal_stride(DiTConfig()) == 4
