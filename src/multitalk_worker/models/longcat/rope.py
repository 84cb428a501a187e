"""LongCat's 3D RoPE (spec §3.8) and the Label-RoPE positions of its two-speaker routing (§3.10).

The head is split into time | rows | columns = D − 4⌊D/6⌋ | 2⌊D/6⌋ | 2⌊D/6⌋ channels (44 | 42 | 42 for
D = 128); each axis has frequencies θ^(−2k/d_axis), each repeated for an adjacent pair of channels. Angles are
position·frequency in float32 (integer positions as float32), cos and sin in float32, the rotation in
float32 on adjacent pairs, rounded to the input dtype: the reference's arithmetic, rounding point for
rounding point. A continuation places its reference latent at time `ref_img_index` ahead of the others.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the time, row and column axes."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def _axis_freqs(axis_dim: int, theta: float) -> Tensor:
    """[axis_dim] float32: θ^(−2k/axis_dim), k = 0 … axis_dim/2 − 1, each repeated twice in place."""
    exponents = torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim
    return (1.0 / (theta**exponents)).repeat_interleave(2)


def time_positions(frames: int, ref_img_index: int | None, num_ref_latents: int) -> Tensor:
    """[frames] float32 times: 0…frames−1, or [ref_img_index, 0, 1, …] with a reference latent."""
    if num_ref_latents and ref_img_index is not None:
        rest = torch.arange(0, frames - num_ref_latents, dtype=torch.float32)
        return torch.cat([torch.tensor([float(ref_img_index)]), rest])
    return torch.arange(frames, dtype=torch.float32)


def rope_3d_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    theta: float,
    ref_img_index: int | None = None,
    num_ref_latents: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """Angles [T·Nh·Nw, head_dim] float32 for tokens in (frame, row, column) order."""
    frames, rows, cols = grid
    dim_t, dim_h, dim_w = axis_split(head_dim)
    t = time_positions(frames, ref_img_index, num_ref_latents)[:, None] * _axis_freqs(dim_t, theta)
    h = torch.arange(rows, dtype=torch.float32)[:, None] * _axis_freqs(dim_h, theta)
    w = torch.arange(cols, dtype=torch.float32)[:, None] * _axis_freqs(dim_w, theta)
    angles = torch.cat(
        [
            t[:, None, None, :].expand(frames, rows, cols, dim_t),
            h[None, :, None, :].expand(frames, rows, cols, dim_h),
            w[None, None, :, :].expand(frames, rows, cols, dim_w),
        ],
        dim=-1,
    )
    return angles.reshape(frames * rows * cols, head_dim).to(device)


def rotate_pairs(x: Tensor, angles: Tensor) -> Tensor:
    """x [B, L, H, D] rotated on adjacent channel pairs by angles [L, D] (pair-repeated), in float32,
    returned in x's dtype: (x₂ₘ, x₂ₘ₊₁) → (x₂ₘ·cos − x₂ₘ₊₁·sin, x₂ₘ₊₁·cos + x₂ₘ·sin)."""
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [L, 1, D]
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def label_positions(ref_map: Tensor, *, class_range: int, class_interval: int) -> Tensor:
    """Label-RoPE query positions from the reference map [K, L] (classes person 1, person 2, background,
    others…) in its dtype (spec §3.10): each person row min-max scaled into [0, interval] and
    [range − interval, range]; every token takes its arg-max class, classes ≥ 2 the background position
    (range/2 with ≤ 3 classes, else 100). Returns [L]."""
    background = class_range // 2 if ref_map.shape[0] <= 3 else 100
    scaled = []
    for row, (lo, hi) in zip(
        ref_map[:2], ((0, class_interval), (class_range - class_interval, class_range)), strict=True
    ):
        normalised = (row - row.min()) / (row.max() - row.min() + 1e-8)
        scaled.append(normalised * (hi - lo) + lo)
    scaled.append(torch.full_like(scaled[0], background))
    winner = ref_map.argmax(dim=0).clamp(max=2)
    return torch.stack(scaled, dim=1).gather(1, winner[:, None]).squeeze(1)


def audio_key_positions(
    streams: int, tokens: int, *, class_range: int, class_interval: int, num_classes: int, dtype: torch.dtype
) -> Tensor:
    """Label-RoPE positions of one frame's audio keys [streams·tokens]: stream 0 at the centre of person 1's
    range (2), stream 1 at person 2's (22), a third (silent background) stream at the background position."""
    first, second = class_interval / 2, class_range - class_interval / 2
    background = class_range // 2 if num_classes <= 3 else 100
    values = [first, second] + [background] * (streams - 2)
    return torch.tensor(values, dtype=dtype).repeat_interleave(tokens)
