"""Audio windows at 25 fps -> per-latent-frame audio context tokens (spec 2.7 and 5.6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multitalk_worker.models.configs import DiTConfig


def vae_temporal_stride(config: DiTConfig) -> int:
    """Video frames per latent frame after the first (4): the vf window is window + stride − 1."""
    return config.audio_vf_window - config.audio_window + 1


def split_audio_windows(audio: Tensor, temporal_stride: int) -> tuple[Tensor, Tensor]:
    """Route per-video-frame windows to latent frames (spec 2.7).

    audio: [..., F, W, C_layers, C] with F = stride·(T−1) + 1 video frames, W the window (5, centre W//2).
    Returns the frame-0 windows [..., 1, W, C_layers, C] and, for latent frames 1..T−1, windows of
    W + stride − 1 audio frames [..., T−1, W+stride−1, C_layers, C]: the left half (and centre) of the
    group's first video frame, the centre of each middle frame, the centre and right half of the last
    frame — the contiguous run of audio frames around the group.
    """
    frames, window = audio.shape[-4], audio.shape[-3]
    if (frames - 1) % temporal_stride:
        raise ValueError(
            f"audio has {frames} video frames; expected {temporal_stride}·(T−1)+1 for T latent frames"
        )
    if temporal_stride < 2:
        raise ValueError(f"temporal stride must be at least 2, got {temporal_stride}")
    centre = window // 2
    first = audio[..., :1, :, :, :]
    groups = audio[..., 1:, :, :, :].unflatten(-4, ((frames - 1) // temporal_stride, temporal_stride))
    # groups: [..., T−1, stride, W, C_layers, C]
    head = groups[..., 0, : centre + 1, :, :]
    middle = groups[..., 1:-1, centre, :, :]
    tail = groups[..., -1, centre:, :, :]
    return first, torch.cat([head, middle, tail], dim=-3)


class AudioProjModel(nn.Module):
    """Windows of wav2vec2 hidden states -> `audio_tokens` tokens of width `audio_dim` per latent frame.

    Parameter names are the checkpoint's (`audio_proj.{proj1, proj1_vf, proj2, proj3, norm}`).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        features = config.audio_layers * config.audio_channels
        self.tokens = config.audio_tokens
        self.token_dim = config.audio_dim
        self.proj1 = nn.Linear(config.audio_window * features, config.audio_hidden)
        self.proj1_vf = nn.Linear(config.audio_vf_window * features, config.audio_hidden)
        self.proj2 = nn.Linear(config.audio_hidden, config.audio_hidden)
        self.proj3 = nn.Linear(config.audio_hidden, config.audio_tokens * config.audio_dim)
        self.norm = nn.LayerNorm(config.audio_dim)  # eps 1e-5, as the reference's default

    def forward(self, first: Tensor, rest: Tensor) -> Tensor:
        """first: [N, 1, W, C_layers, C]; rest: [N, T−1, W_vf, C_layers, C] (N = batch·persons).

        Returns [N, T, tokens, audio_dim] in the parameters' dtype.
        """
        n, frames = first.shape[0], 1 + rest.shape[1]
        # Frame 0 as a 2D strided view and the other frames as 2D rows, like the reference: bf16 GEMMs can
        # round differently for other input layouts.
        h0 = torch.relu(self.proj1(first[:, 0].flatten(1)))  # [N, hidden]
        h1 = torch.relu(self.proj1_vf(rest.flatten(2).flatten(0, 1)))  # [N·(T−1), hidden]
        h = torch.cat([h0.unsqueeze(1), h1.unflatten(0, (n, frames - 1))], dim=1).flatten(
            0, 1
        )  # [N·T, hidden]
        tokens = self.proj3(torch.relu(self.proj2(h))).unflatten(-1, (self.tokens, self.token_dim))
        return self.norm(tokens).unflatten(0, (n, frames))  # [N, T, tokens, dim]
