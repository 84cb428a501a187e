"""Rotary position embeddings of the MultiTalk DiT (spec 5.5 and 5.8). Pure functions, no state.

Both encodings rotate pairs of *adjacent* channels (2i, 2i+1) of a head:
``out_2i = x_2i·cos − x_2i+1·sin``, ``out_2i+1 = x_2i+1·cos + x_2i·sin``.

* 3D RoPE (self-attention q/k): the D/2 pairs are split between latent frame, token row and token column;
  angles and rotation in float64 (the reference multiplies in complex128), result float32.
* Label-RoPE (audio cross-attention, two persons): one position per token over the whole head; positions
  in the model dtype, angles and rotation in float32, result in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROPE_THETA = 10000.0


def rope_3d_split(head_dim: int) -> tuple[int, int, int]:
    """Channel counts (time, height, width) of the 3D RoPE: 44/42/42 for a head dim of 128."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(length: int, axis_dim: int, theta: float) -> Tensor:
    """[length, axis_dim/2] float64 angles pos·θ^(−2i/axis_dim), built on the CPU as the reference does."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    return torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)


def rope_3d_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    max_positions: int = 1024,
    theta: float = ROPE_THETA,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the 3D RoPE angles for a (frames, rows, cols) token grid in row-major token order.

    Returns two float64 tensors [L, 1, head_dim/2] (L = frames·rows·cols; the 1 broadcasts over heads).
    Positions start at 0 on every axis; each axis must be shorter than `max_positions` (the reference's
    table length).
    """
    if max(grid) > max_positions:
        raise ValueError(f"token grid {grid} exceeds the RoPE table of {max_positions} positions per axis")
    frames, rows, cols = grid
    dims = rope_3d_split(head_dim)
    parts = [
        _axis_angles(n, d, theta).to(device)
        for n, d in zip(grid, dims, strict=True)  # each axis has its own frequency table
    ]
    angles = torch.cat(
        [
            parts[0][:, None, None].expand(frames, rows, cols, -1),
            parts[1][None, :, None].expand(frames, rows, cols, -1),
            parts[2][None, None, :].expand(frames, rows, cols, -1),
        ],
        dim=-1,
    ).reshape(frames * rows * cols, 1, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (same float dtype as cos/sin) by the given angles."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def apply_rope_3d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """3D RoPE on x [B, L, H, D] with tables from `rope_3d_tables`; rotation in float64, float32 result."""
    return _rotate_pairs(x.to(torch.float64), cos, sin).to(torch.float32)


def apply_rope_3d_fp32(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The fast path's 3D RoPE: rotation in float32 on float32 tables (`rope_3d_tables(...)` cast to
    float32); returns x's dtype. Differs from `apply_rope_3d` + rounding to bf16 by ≤ 1 bf16 step."""
    return _rotate_pairs(x.float(), cos.float(), sin.float()).to(x.dtype)


def lrope_ranges(class_range: int, class_interval: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Label-RoPE position ranges: person 1, person 2 and the background position (0–4, 20–24, 12)."""
    return (0, class_interval), (class_range - class_interval, class_range), class_range // 2


def label_rope_positions(
    ref_map: Tensor, *, class_range: int, class_interval: int, bounds: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Positions of the visual tokens from the reference attention map (spec 5.8 steps 1–3).

    ref_map: [B, 3, L] (person 1, person 2, background) in the model dtype. Each person's row is min-max
    normalised over L into its range; every token takes the position of its arg-max class (first index
    on ties), the background a fixed position. All arithmetic in ref_map's dtype, as in the reference.
    `bounds`: (min, max) of the two person rows over all L tokens, each [B, 2], where ref_map holds only
    some of the tokens (sequence parallelism); None computes them from ref_map.
    Returns [B, L] in ref_map's dtype.
    """
    (lo1, hi1), (lo2, hi2), background = lrope_ranges(class_range, class_interval)
    if bounds is None:
        bounds = (ref_map[:, :2].amin(dim=-1), ref_map[:, :2].amax(dim=-1))
    scaled = []
    for c, (new_lo, new_hi) in enumerate(((lo1, hi1), (lo2, hi2))):
        row, lo, hi = ref_map[:, c], bounds[0][:, c : c + 1], bounds[1][:, c : c + 1]
        normalised = (row - lo) / (hi - lo + 1e-8)
        scaled.append(normalised * (new_hi - new_lo) + new_lo)
    scaled.append(torch.full_like(scaled[0], background))
    candidates = torch.stack(scaled, dim=-1)  # [B, L, 3]
    winner = ref_map.argmax(dim=1)  # [B, L]
    return candidates.gather(-1, winner.unsqueeze(-1)).squeeze(-1)


def audio_key_positions(
    num_persons: int,
    tokens_per_person: int,
    *,
    class_range: int,
    class_interval: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> Tensor:
    """Label-RoPE positions of one frame's audio tokens: the centre of each person's range (2 and 22).

    Returns [num_persons·tokens_per_person] in `dtype`; person 1's tokens first.
    """
    if num_persons != 2:
        raise ValueError(f"Label-RoPE is defined for two persons, got {num_persons}")
    (lo1, hi1), (lo2, hi2), _ = lrope_ranges(class_range, class_interval)
    centres = torch.tensor([(lo1 + hi1) / 2, (lo2 + hi2) / 2], dtype=dtype, device=device)
    return centres.repeat_interleave(tokens_per_person)


def apply_rope_1d(x: Tensor, positions: Tensor, *, theta: float = ROPE_THETA) -> Tensor:
    """Label-RoPE over the whole head: x [..., N, H, D], positions broadcastable to [..., N].

    Inverse frequencies θ^(−2i/D) in float32 (built on the CPU, as the reference does); angles
    position·freq, rotation in float32; returns x's dtype.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq.to(x.device)  # [..., N, D/2]
    angles = angles.unsqueeze(-2)  # broadcast over heads
    return _rotate_pairs(x.float(), torch.cos(angles), torch.sin(angles)).to(x.dtype)
