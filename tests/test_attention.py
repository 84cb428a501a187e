from __future__ import annotations

import pytest
import torch

import multitalk_worker.models.attention as attention_module
from multitalk_worker.models.attention import (
    BACKENDS,
    LOSSY_BACKENDS,
    AttentionBackendUnavailable,
    attention,
    probe_backend,
)
from multitalk_worker.models.fp8_attention import (
    FP8_MAX,
    _descale,
    _quantize,
    emulated_fp8_kernel,
    fp8_attention,
)


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


# ----------------------------------------------------------------------------- fp8 attention and the probe


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _explicit(q, k, v, q.shape[-1] ** -0.5).float()


def _fp8_err(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **knobs: object) -> float:
    out = fp8_attention(q, k, v, None, kernel=emulated_fp8_kernel, **knobs)  # type: ignore[arg-type]
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _exact(q, k, v)
    return ((out.float() - ref).norm() / ref.norm()).item()


def _offset_qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention-like inputs whose K and V share a large per-channel offset over the tokens (as the
    K of real DiTs does); scores are O(1) after the offset, so the attention is not degenerate."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 256, 2, 64, generator=g)
    offset = torch.randn(1, 1, 2, 64, generator=g) * 12
    k = torch.randn(1, 256, 2, 64, generator=g) + offset
    v = torch.randn(1, 256, 2, 64, generator=g) + offset
    return q, k, v


def test_fp8_smoothing_leaves_the_function_and_cuts_the_error() -> None:
    q, k, v = _offset_qkv(5)
    smoothed = _fp8_err(q, k, v)
    naive = _fp8_err(q, k, v, smooth_k=False, smooth_v=False)
    assert smoothed < 2e-3, smoothed  # measured 3.8e-4 (seed 5)
    assert naive > 5 * smoothed, (naive, smoothed)  # measured 4.8e-3
    assert _fp8_err(q, k, v, smooth_v=False) > 5 * smoothed  # V's offset alone: 3.9e-3


def test_fp8_query_blocks_split_any_length() -> None:
    q, k, v = _offset_qkv(6)
    one = _fp8_err(q[:, :250], k, v)
    three = _fp8_err(q[:, :250], k, v, query_blocks=3)  # 250 queries in blocks of 84, 83, 83
    assert three < 2e-3 and abs(three - one) < 5e-4


def test_fp8_quantize_scales_onto_the_e4m3_range() -> None:
    x = torch.randn(2, 10, 3, 8) * torch.tensor([1.0, 50.0, 1e-3])[None, None, :, None]
    descale = _descale(x)
    assert descale.shape == (2, 3)
    q8 = _quantize(x, descale)
    assert q8.dtype == torch.float8_e4m3fn
    assert q8.float().abs().amax(dim=(1, 3)).allclose(torch.full((2, 3), FP8_MAX))
    back = q8.float() * descale[:, None, :, None]
    assert ((back - x).abs() <= x.abs() * 2**-4 + descale[:, None, :, None] * 2**-9).all()
    assert (_descale(torch.zeros(1, 4, 1, 8)) > 0).all()  # an all-zero head does not divide by zero


def test_probe_accepts_a_working_backend_and_names_a_broken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe_backend("sdpa", torch.device("cpu")) < 1e-5
    with pytest.raises(ValueError, match="accepted"):
        probe_backend("flash9", torch.device("cpu"))

    def transposed_stand_in(q, k, v, scale):  # a kernel that returns the wrong function
        return BACKENDS["sdpa"](q, k, v, scale).flip(1)

    monkeypatch.setitem(BACKENDS, "flash3", transposed_stand_in)
    with pytest.raises(AttentionBackendUnavailable, match="'flash3' is off by"):
        probe_backend("flash3", torch.device("cpu"))


def test_flash3_without_its_package_or_gpu_is_unavailable() -> None:
    """On a CPU-only machine FA3 either does not import or refuses the CPU tensors: both are reported as
    AttentionBackendUnavailable, the type the engine turns into a startup error."""
    for name in ("flash3", "flash3_fp8"):
        with pytest.raises(AttentionBackendUnavailable, match="."):
            probe_backend(name, torch.device("cpu"))
    assert LOSSY_BACKENDS == {"flash3_fp8"} and LOSSY_BACKENDS <= set(BACKENDS)


def _fa3_stand_in(q, k, v, softmax_scale, q_descale=None, k_descale=None, v_descale=None):
    """FA3's `flash_attn_func` contract on a CPU: [B, L, H, D], e4m3 inputs with [B, H] descales."""
    if q_descale is not None:
        return emulated_fp8_kernel(q, k, v, softmax_scale, q_descale, k_descale, v_descale)
    return BACKENDS["sdpa"](q, k, v, softmax_scale)


@pytest.mark.parametrize("backend", ["flash3", "flash3_fp8"])
def test_flash3_backends_compile_to_one_graph(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The FA3 calls are opaque custom ops: a compiled block stays one graph around them (a graph break
    inside fp8_attention's loop once left its quantisation eager)."""
    monkeypatch.setattr(attention_module, "flash3_func", lambda: _fa3_stand_in)
    q, k, v = _offset_qkv(7)

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q * 2, k, v, backend=backend) + 1

    explained = torch._dynamo.explain(block)(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ref = _exact(q * 2, k, v) + 1
    err = ((block(q, k, v).float() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if backend == "flash3_fp8" else 1e-5)
