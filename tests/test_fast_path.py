"""The DiT fast path (models/runtime.py) against the reference path on the same inputs (STYLE habit 8).

CPU tests run each shortcut that runs on a CPU; kernels that need CUDA carry the `gpu` marker.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import multitalk_worker.models.runtime as runtime_module
from multitalk_worker.errors import InvalidInput, ModelLoadFailed
from multitalk_worker.models.attention import BACKENDS, AttentionBackendUnavailable, attention, flash3_func
from multitalk_worker.models.audio_attention import reference_attention_map, reference_attention_map_fused
from multitalk_worker.models.batching import group_passes, predict_passes, stack_pass_inputs
from multitalk_worker.models.rope import apply_rope_3d, apply_rope_3d_fp32, rope_3d_tables
from multitalk_worker.models.runtime import (
    AUTO,
    FAST_RUNTIME,
    REFERENCE_RUNTIME,
    DiTRuntime,
    compile_blocks,
    resolve_runtime,
)
from multitalk_worker.pipeline.engine import ENGINES, engine_options, resolve_engine
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


def test_lossy_backends_serve_self_attention_only() -> None:
    with pytest.raises(ValueError, match="lossy.*self-attention only"):
        DiTRuntime(attention_backend="flash3_fp8")
    runtime = DiTRuntime(attention_backend="flash3", self_attention_backend="flash3_fp8")
    assert runtime.self_backend == "flash3_fp8" and FAST_RUNTIME.self_backend == "sdpa"
    assert runtime.exact().self_backend == "flash3"
    with pytest.raises(ValueError, match="accepted"):
        DiTRuntime(self_attention_backend="flash9")


def test_self_attention_backend_reaches_self_attention_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention call of a forward, by backend: the self-attention backend sees exactly one call per
    block (queries and keys of all L tokens), minus the blocks kept exact; the rest stay on "sdpa"."""
    calls: list[tuple[str, int, int]] = []

    def recording(name: str):
        def run(q, k, v, scale):
            calls.append((name, q.shape[1], k.shape[1]))
            return BACKENDS["sdpa"](q, k, v, scale)

        return run

    # the stand-in for FA3's fp8 kernel computes exactly, so only the routing is under test here
    monkeypatch.setitem(BACKENDS, "flash3_fp8", recording("flash3_fp8"))
    model, inputs = _model(), _inputs(1, 2)
    tokens = 2 * 4 * 4  # 2 latent frames of 8x8 latents, 2x2 patches
    for exact_blocks in (0, 1):
        calls.clear()
        runtime = dataclasses.replace(
            CPU_FAST, self_attention_backend="flash3_fp8", exact_self_attention_blocks=exact_blocks
        )
        with torch.no_grad():
            out = model(**inputs, runtime=runtime)
            ref = model(**inputs, runtime=CPU_FAST)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert calls == [("flash3_fp8", tokens, tokens)] * (CFG.num_layers - exact_blocks)


def test_resolve_on_cpu_picks_sdpa_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="multitalk_worker.models.runtime"):
        runtime = resolve_runtime(FAST_RUNTIME, torch.device("cpu"), attention=AUTO, fp8_attention=None)
    assert runtime == FAST_RUNTIME and runtime.self_backend == "sdpa"
    assert len(caplog.records) == 1 and "sdpa" in caplog.records[0].getMessage()
    with pytest.raises(AttentionBackendUnavailable):  # named: must run, or it is an error
        resolve_runtime(FAST_RUNTIME, torch.device("cpu"), attention="flash3", fp8_attention=False)
    with pytest.raises(AttentionBackendUnavailable, match="flash3_fp8"):
        resolve_runtime(FAST_RUNTIME, torch.device("cpu"), attention="sdpa", fp8_attention=True)


def _exact_stand_in(q, k, v, scale):  # stands in for the FA3 kernels where none can run (CPU)
    return BACKENDS["sdpa"](q, k, v, scale)


def _broken_stand_in(q, k, v, scale):
    raise RuntimeError("FlashAttention only supports Hopper GPUs or newer")  # FA3's own refusal


@pytest.mark.parametrize("works", [True, False])
def test_resolve_on_hopper_prefers_flash3_and_falls_back_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, works: bool
) -> None:
    monkeypatch.setattr(runtime_module, "_is_hopper", lambda device: True)
    kernel = _exact_stand_in if works else _broken_stand_in
    monkeypatch.setitem(BACKENDS, "flash3", kernel)
    monkeypatch.setitem(BACKENDS, "flash3_fp8", kernel)
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="multitalk_worker.models.runtime"):
        bf16 = resolve_runtime(FAST_RUNTIME, cpu, attention=AUTO, fp8_attention=False)
    assert bf16.attention_backend == ("flash3" if works else "sdpa") and bf16.self_attention_backend is None
    assert len(caplog.records) == 1  # the choice, or the fallback and its reason, in one line
    assert works or "Hopper GPUs or newer" in caplog.records[0].getMessage()
    fp8 = resolve_runtime(FAST_RUNTIME, cpu, attention=AUTO, fp8_attention=None)
    assert fp8.self_backend == ("flash3_fp8" if works else "sdpa")


def test_engine_resolves_attention_at_load() -> None:
    assert ENGINES["fast"].attention == AUTO and ENGINES["reference"].attention is None
    cpu = torch.device("cpu")
    assert resolve_engine(ENGINES["reference"], cpu) == ENGINES["reference"]  # no probe, no change
    fast = resolve_engine(engine_options("fast", fp8=True), cpu)
    assert fast.runtime.attention_backend == "sdpa" and fast.runtime.self_attention_backend is None
    with pytest.raises(ModelLoadFailed, match="flash3"):  # named and unable to run: a startup error
        resolve_engine(engine_options("fast", attention="flash3"), cpu)
    with pytest.raises(InvalidInput, match="accepted.*or 'auto'"):
        engine_options("fast", attention="flash9")
    with pytest.raises(InvalidInput, match="fp8 tier"):
        dataclasses.replace(ENGINES["fast"], fp8_attention=True)


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


def _flash3_runs() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    try:
        flash3_func()
    except AttentionBackendUnavailable:
        return False
    return True


HOPPER_FA3 = pytest.mark.skipif(not _flash3_runs(), reason="needs a Hopper GPU with FlashAttention-3")
# The DiT's attention shapes at 448x896x81 (32,928 tokens, 40 heads x 128): q tokens, k tokens, batch.
DIT_SHAPES = {
    "self": (32928, 32928, 1),
    "text": (32928, 512, 1),
    "audio": (1568, 64, 21),
    "refmap": (32928, 1568, 1),
}


@pytest.mark.gpu
@HOPPER_FA3
@pytest.mark.parametrize("shape", sorted(DIT_SHAPES))
def test_flash3_matches_sdpa_at_dit_shapes(shape: str) -> None:
    lq, lk, batch = DIT_SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, lq, 40, 128, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(batch, lk, 40, 128, generator=g, device="cuda").bfloat16() for _ in range(2))
    ref = BACKENDS["sdpa"](q.float(), k.float(), v.float(), None)  # float32 (memory-efficient kernel)

    def err(backend: str) -> float:
        out = BACKENDS[backend](q, k, v, None)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        return ((out.float() - ref).norm() / ref.norm()).item()

    sdpa, flash3 = err("sdpa"), err("flash3")
    assert flash3 < 1e-2 and flash3 < 1.5 * sdpa + 1e-4, (flash3, sdpa)
    if shape == "self":
        assert err("flash3_fp8") < 8e-2


@pytest.mark.gpu
@HOPPER_FA3
def test_auto_picks_flash3_on_hopper() -> None:
    device = torch.device("cuda")
    runtime = resolve_runtime(FAST_RUNTIME, device, attention=AUTO, fp8_attention=None)
    assert runtime.attention_backend == "flash3" and runtime.self_backend == "flash3_fp8"
    config = dataclasses.replace(CFG, dim=128)  # head dim 64: FA3 runs head dims 64-256
    model = _model(config=config).to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in _inputs(1, 2).items()}
    with torch.no_grad():
        ref = model(**inputs)
        fast = model(**inputs, runtime=runtime.exact())
    assert (fast - ref).norm() / ref.norm() < 2e-2
