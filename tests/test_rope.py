from __future__ import annotations

import pytest
import torch

from multitalk_worker.models.rope import (
    apply_rope_1d,
    apply_rope_3d,
    audio_key_positions,
    label_rope_positions,
    lrope_ranges,
    rope_3d_split,
    rope_3d_tables,
)


def _complex_rope_3d(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Direct complex128 3D RoPE: per-axis polar tables, complex multiply of adjacent-channel pairs."""
    head_dim = x.shape[-1]
    spatial = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * spatial, spatial, spatial)
    tables = []
    for n, d in zip(grid, axis_dims, strict=True):
        inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
        tables.append(torch.polar(torch.ones_like(angles), angles))
    f, h, w = grid
    freqs = torch.cat(
        [
            tables[0][:, None, None].expand(f, h, w, -1),
            tables[1][None, :, None].expand(f, h, w, -1),
            tables[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs).flatten(-2).float()


def test_rope_3d_split() -> None:
    assert rope_3d_split(128) == (44, 42, 42)
    assert rope_3d_split(16) == (8, 4, 4)
    with pytest.raises(ValueError):
        rope_3d_split(15)


@pytest.mark.parametrize(("grid", "head_dim"), [((3, 4, 5), 16), ((2, 3, 2), 128)])
def test_rope_3d_matches_complex128(grid: tuple[int, int, int], head_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, length, 3, head_dim, generator=g).bfloat16()
    cos, sin = rope_3d_tables(grid, head_dim)
    out = apply_rope_3d(x, cos, sin)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, _complex_rope_3d(x, grid), rtol=1e-6, atol=1e-7)


def test_rope_3d_position_zero_is_identity_and_grid_limit() -> None:
    x = torch.randn(1, 4 * 3 * 2, 2, 16)
    cos, sin = rope_3d_tables((4, 3, 2), 16)
    out = apply_rope_3d(x, cos, sin)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # token (0, 0, 0)
    assert not torch.allclose(out[:, 1], x[:, 1])
    with pytest.raises(ValueError, match="exceeds"):
        rope_3d_tables((2, 3, 1025), 16)


def test_label_rope_positions_hand_made_map() -> None:
    # tokens: 0 person 1 wins at its max, 1 person 2 wins at its max, 2 background wins,
    # 3 tie person 1 / person 2 (first index wins), 4 person 1 wins at 3/4 of its range
    ref_map = torch.tensor(
        [
            [1.0, 0.0, 0.25, 0.5, 0.75],
            [0.0, 1.0, 0.25, 0.5, 0.5],
            [0.0, 0.0, 0.75, 0.25, 0.0],
        ],
        dtype=torch.bfloat16,
    )[None]
    pos = label_rope_positions(ref_map, class_range=24, class_interval=4)
    assert pos.dtype == torch.bfloat16
    assert pos.tolist() == [[4.0, 24.0, 12.0, 2.0, 3.0]]


def test_label_rope_positions_normalise_each_person_by_its_own_range() -> None:
    # person 2's row spans [0.5, 1.5]: its tokens land at 20 + 4·(v − 0.5)/1.0
    ref_map = torch.tensor([[0.25, 0.0, 0.0, 0.25], [0.5, 1.5, 1.0, 0.5], [0.0, 0.0, 0.0, 0.75]])[None]
    pos = label_rope_positions(ref_map, class_range=24, class_interval=4)[0]
    expected = torch.tensor([20.0, 24.0, 22.0, 12.0])
    # first token: person 2 wins at its minimum (0.5 > 0.25); last: background wins (0.75 > 0.5)
    torch.testing.assert_close(pos, expected, rtol=0, atol=1e-6)


def test_audio_key_positions_from_class_layout() -> None:
    assert lrope_ranges(24, 4) == ((0, 4), (20, 24), 12)
    pos = audio_key_positions(2, 3, class_range=24, class_interval=4, dtype=torch.bfloat16)
    assert pos.tolist() == [2.0, 2.0, 2.0, 22.0, 22.0, 22.0]
    other = audio_key_positions(2, 1, class_range=10, class_interval=2, dtype=torch.float32)
    assert other.tolist() == [1.0, 9.0]
    with pytest.raises(ValueError):
        audio_key_positions(1, 3, class_range=24, class_interval=4, dtype=torch.float32)


def test_rope_1d_matches_complex_formula() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 2, 16, generator=g)  # [frames, tokens, heads, D]
    positions = torch.tensor([0.0, 2.0, 3.5, 21.25, 24.0])
    out = apply_rope_1d(x, positions)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    rot = torch.polar(torch.ones(5, 8, dtype=torch.float64), positions.double()[:, None] * inv)[:, None]
    xc = torch.view_as_complex(x.double().reshape(3, 5, 2, 8, 2))
    expected = torch.view_as_real(xc * rot).flatten(-2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_rope_1d_scores_depend_on_relative_position_only() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)

    def score(pq: float, pk: float) -> float:
        rq = apply_rope_1d(q, torch.tensor([pq]))
        rk = apply_rope_1d(k, torch.tensor([pk]))
        return float((rq * rk).sum())

    assert score(2.0, 2.0) == pytest.approx(score(22.0, 22.0), abs=1e-4)
    assert score(3.0, 2.0) == pytest.approx(score(23.0, 22.0), abs=1e-4)
    assert score(2.0, 2.0) != pytest.approx(score(2.0, 22.0), abs=1e-2)


def test_rope_1d_keeps_dtype() -> None:
    x = torch.randn(2, 4, 2, 16).bfloat16()
    assert apply_rope_1d(x, torch.zeros(4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    torch.testing.assert_close(apply_rope_1d(x, torch.zeros(4)), x)
