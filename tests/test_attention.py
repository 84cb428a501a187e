from __future__ import annotations

import pytest
import torch

from multitalk_worker.models.attention import BACKENDS, attention


def _qkv(seed: int, lq: int = 7, lk: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, lq, 3, 8, generator=g)
    k = torch.randn(2, lk, 3, 8, generator=g)
    v = torch.randn(2, lk, 3, 8, generator=g)
    return q, k, v


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ·scale) v per batch and head, in float64, back to [B, L, H, D]."""
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) * scale, dim=-1)
    return (probs @ v64).transpose(1, 2)


def test_sdpa_matches_explicit_softmax_default_scale() -> None:
    q, k, v = _qkv(0)
    out = attention(q, k, v, backend="sdpa")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _explicit(q, k, v, 8**-0.5), rtol=1e-5, atol=1e-6)


def test_sdpa_matches_explicit_softmax_custom_scale() -> None:
    q, k, v = _qkv(1, lq=4, lk=9)
    out = attention(q, k, v, scale=0.05)
    torch.testing.assert_close(out.double(), _explicit(q, k, v, 0.05), rtol=1e-5, atol=1e-6)


def test_sdpa_keeps_bf16() -> None:
    q, k, v = (t.bfloat16() for t in _qkv(2))
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _explicit(q, k, v, 8**-0.5), rtol=2e-2, atol=2e-2)


def test_unknown_backend_raises_and_lists_accepted() -> None:
    q, k, v = _qkv(3)
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'.*sdpa"):
        attention(q, k, v, backend="flash9")
    assert "sdpa" in BACKENDS


def test_wrong_layout_raises() -> None:
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        attention(q.flatten(2), k, v)
