"""The DiT fast path (models/runtime.py) against the reference path on the same inputs (STYLE habit 8).

CPU tests run each shortcut that runs on a CPU; kernels that need CUDA carry the `gpu` marker.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from multitalk_worker.models.attention import BACKENDS, attention
from multitalk_worker.models.audio_attention import reference_attention_map, reference_attention_map_fused
from multitalk_worker.models.batching import group_passes, predict_passes, stack_pass_inputs
from multitalk_worker.models.rope import apply_rope_3d, apply_rope_3d_fp32, rope_3d_tables
from multitalk_worker.models.runtime import FAST_RUNTIME, REFERENCE_RUNTIME, DiTRuntime, compile_blocks
from tests.test_transformer import CFG, _inputs, _masks, _model

CPU_FAST = dataclasses.replace(FAST_RUNTIME, attention_backend="sdpa")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_runtime_defaults_are_the_reference_path_and_names_are_checked() -> None:
    assert REFERENCE_RUNTIME == DiTRuntime(
        attention_backend="sdpa", fp32_rope=False, fused_reference_map=False
    )
    assert FAST_RUNTIME.fp32_rope and FAST_RUNTIME.fused_reference_map
    with pytest.raises(ValueError, match="accepted"):
        DiTRuntime(attention_backend="flash9")
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAST_RUNTIME.fp32_rope = False  # type: ignore[misc]


def test_fp32_rope_matches_float64_rope_to_one_bf16_step() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 3 * 6 * 8, 4, 128, generator=g) * 3).bfloat16()
    cos, sin = rope_3d_tables((3, 6, 8), 128)
    ref = apply_rope_3d(x, cos, sin).bfloat16()
    fast = apply_rope_3d_fp32(x, cos.float(), sin.float())
    assert fast.dtype == torch.bfloat16
    diff = (fast.float() - ref.float()).abs()
    step = ref.float().abs().clamp_min(1e-30) * 2**-7  # one bf16 ulp (8 significant bits)
    assert (diff <= step).all()
    assert (diff > 0).float().mean() < 1e-3  # nearly every element identical
    # a float32 input rotates like the float64 path to float32 accuracy
    xf = torch.randn(1, 3 * 6 * 8, 4, 128, generator=g)
    torch.testing.assert_close(
        apply_rope_3d_fp32(xf, cos, sin), apply_rope_3d(xf, cos, sin), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_reference_map_matches_reference(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    frames, rows, cols, heads, head_dim = 3, 4, 6, 4, 16
    q = torch.randn(2, frames * rows * cols, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(2, frames * rows * cols, heads, head_dim, generator=g).to(dtype)
    masks = torch.nn.functional.interpolate(_masks(8, 12)[None], size=(rows, cols), mode="nearest")[0]
    masks = (masks > 0).flatten(1).to(dtype)
    ref = reference_attention_map(q, k, masks, head_groups=2)
    fast = reference_attention_map_fused(q, k, masks, head_groups=2)
    assert fast.shape == ref.shape == (2, 3, frames * rows * cols) and fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="groups"):
        reference_attention_map_fused(q, k, masks, head_groups=3)


@pytest.mark.parametrize("persons", [1, 2])
def test_fast_runtime_forward_matches_reference_float32(persons: int) -> None:
    model = _model()
    inputs = _inputs(1, persons)
    with torch.no_grad():
        ref = model(**inputs)
        fast = model(**inputs, runtime=CPU_FAST)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fast_runtime_forward_bf16_close_to_reference() -> None:
    model = _model().to(torch.bfloat16)
    inputs = _inputs(1, 2)
    with torch.no_grad():
        ref = model(**inputs)
        fast = model(**inputs, runtime=CPU_FAST)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert (fast - ref).norm() / ref.norm() < 2e-2


def test_group_and_stack_passes() -> None:
    assert group_passes({"cond": 2, "drop_text": 2, "uncond": 1}) == [("cond", "drop_text"), ("uncond",)]
    assert group_passes({"cond": 1, "drop_text": 1, "uncond": 1}) == [("cond", "drop_text", "uncond")]
    a, b = torch.ones(1, 3, 4), torch.full((1, 5, 4), 2.0)
    context, audio = stack_pass_inputs([a, b], [torch.zeros(1, 2, 9), torch.ones(1, 2, 9)], text_len=6)
    assert context.shape == (2, 6, 4) and audio.shape == (2, 2, 9)
    assert context[0, 3:].abs().sum() == 0 and context[1, :5].eq(2).all() and context[1, 5].eq(0).all()


@pytest.mark.parametrize("persons", [1, 2])
def test_batched_guidance_passes_match_separate_calls(persons: int) -> None:
    model = _model()
    base = _inputs(1, persons, seed=3)
    g = torch.Generator().manual_seed(4)
    neg_context = torch.randn(1, 3, CFG.text_dim, generator=g)
    silent = torch.zeros_like(base["audio"])[:, -1:]
    passes = {
        "cond": (base["context"], base["audio"]),
        "drop_text": (neg_context, base["audio"]),
        "uncond": (neg_context, silent),
    }
    shared = {k: base[k] for k in ("latent", "timestep", "clip_fea", "y", "person_masks")}
    with torch.no_grad():
        batched = predict_passes(model, **shared, passes=passes, runtime=CPU_FAST)
        for label, (context, audio) in passes.items():
            single = model(**{**shared, "context": context, "audio": audio})
            torch.testing.assert_close(batched[label], single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched["cond"], batched["drop_text"])


def test_compile_blocks_compiles_every_block_in_place() -> None:
    model = _model()
    assert compile_blocks(model) == CFG.num_layers
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_cuda_backends_match_sdpa_math(backend: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 8, 128, generator=g, device="cuda").bfloat16() for _ in range(3))
    ref = attention(q.double(), k.double(), v.double()).float()
    out = BACKENDS[backend](q, k, v, None).float()
    assert (out - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@CUDA
def test_fast_runtime_on_cuda_matches_reference() -> None:
    model = _model().to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in _inputs(1, 2).items()}
    with torch.no_grad():
        ref = model(**inputs)
        fast = model(**inputs, runtime=FAST_RUNTIME)
    assert (fast - ref).norm() / ref.norm() < 2e-2
