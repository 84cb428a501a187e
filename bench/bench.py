"""Speed of the MultiTalk DiT and Wan VAE on one GPU, reference path vs fast paths, in one process.

    python bench/bench.py --out DIR [--parts attn,dit,compile,720p,fp8,clip,vae] [--clip-steps N] [--tiny]

Builds the full-size DiT on the meta device, materialises it on the GPU in bf16 with random weights (no
checkpoint is read), and times one forward (median after warm-up, CUDA events) for the reference path
and the fast paths (models/runtime.py) on the same inputs; reports each fast path's error against the
reference output (‖fast − ref‖ / ‖ref‖ of the float32 prediction), peak GPU memory per case and the time
from process start to a resident model. The clips are DiT + VAE only (steps × guidance passes, then the
VAE decode): the audio/image/text encoders are not run. Writes DIR/results.json and prints a table last.
Parts run in a fixed order (main()); `fp8` converts the DiT's weights in place, so it runs after the bf16
parts. All parts together take longer than one 10-minute device call; bench/RESULTS.md lists the part sets
of the recorded runs. Each case is written to DIR/partial.json as soon as it is measured.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from multitalk_worker.models.attention import BACKENDS, LOSSY_BACKENDS, attention  # noqa: E402
from multitalk_worker.models.batching import predict_passes  # noqa: E402
from multitalk_worker.models.configs import TINY, WAN_14B_480P, DiTConfig, VAEConfig  # noqa: E402
from multitalk_worker.models.runtime import FAST_RUNTIME, REFERENCE_RUNTIME, DiTRuntime, compile_blocks  # noqa: E402
from multitalk_worker.models.transformer import MultiTalkTransformer  # noqa: E402

log = logging.getLogger("bench")

# The fp8 self-attention's accuracy knobs (models/fp8_attention.py), as bench-only backend names next to the
# tier's own "flash3_fp8" (K and V smoothing, one Q scale per head): registered in main() for the runs.
FP8_VARIANTS: dict[str, dict] = {
    "fp8_naive": {"smooth_k": False, "smooth_v": False},  # one amax scale per head, nothing else
    "fp8_smoothk": {"smooth_k": True, "smooth_v": False},
    "fp8_q8": {"query_blocks": 8},  # smoothing + 8 Q scales per head
}


def register_fp8_variants() -> None:
    from multitalk_worker.models.attention import _flash3_fp8_kernel
    from multitalk_worker.models.fp8_attention import fp8_attention

    for name, knobs in FP8_VARIANTS.items():
        BACKENDS[name] = lambda q, k, v, scale, knobs=knobs: fp8_attention(
            q, k, v, scale, kernel=_flash3_fp8_kernel, **knobs
        )


RESULTS: dict[str, dict] = {}
LOSSY = LOSSY_BACKENDS
EXACT = ("sdpa", "flash", "cudnn", "efficient", "flash3")
STORE: dict[str, torch.Tensor] = {}  # reference outputs for error checks


# ----------------------------------------------------------------------------- helpers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], warmup: int, reps: int) -> tuple[list[float], object, float]:
    """Run fn warmup+reps times; returns per-rep seconds, the last output and the first call's seconds."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, out, first


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


OUT_FILE: list[Path] = []  # results.json, rewritten after every case so that a killed run keeps its numbers


def record(name: str, **fields: object) -> None:
    RESULTS[name] = fields
    log.info("%s: %s", name, fields)
    if OUT_FILE:
        OUT_FILE[0].write_text(json.dumps({"results": RESULTS}, indent=1))


def guarded(name: str, fn: Callable[[], None]) -> bool:
    """Run one case; a failure is recorded with its reason and the run goes on."""
    try:
        fn()
        return True
    except Exception as exc:  # noqa: BLE001 - a bench records failures and continues
        record(name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
        return False
    finally:
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- model and inputs


@torch.no_grad()
def build_dit(cfg: DiTConfig, device: str | torch.device) -> MultiTalkTransformer:
    """Meta-device build, then uninitialised bf16 storage on `device`, then random init in place."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MultiTalkTransformer(cfg)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "modulation" not in name:
            p.normal_(0.0, (p[0].numel()) ** -0.5, generator=g)
        elif "modulation" in name:
            p.normal_(0.0, cfg.dim**-0.5, generator=g)
        elif name.endswith("weight"):  # norm weights
            p.normal_(1.0, 0.1, generator=g)
        else:  # biases
            p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def dit_inputs(
    cfg: DiTConfig,
    hw: tuple[int, int],
    frames: int,
    batch: int,
    persons: int,
    device: str | torch.device,
) -> dict:
    """Random inputs for a [hw] pixel bucket (latent = pixels/8) with `frames` latent frames."""
    g = torch.Generator(device=device).manual_seed(1)
    h, w = hw[0] // 8, hw[1] // 8
    video_frames = 4 * (frames - 1) + 1

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device) * scale

    masks = torch.zeros(3, h, w, device=device)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return {
        "latent": rnd(batch, 16, frames, h, w),
        "timestep": torch.full((batch,), 937.5, device=device),
        "context": rnd(batch, min(120, cfg.text_len), cfg.text_dim, scale=0.2).bfloat16(),
        "clip_fea": rnd(batch, 257, cfg.image_dim).bfloat16(),
        "y": rnd(batch, 20, frames, h, w),
        "audio": rnd(
            batch, persons, video_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, scale=0.5
        ).bfloat16(),
        "person_masks": masks,
    }


# ----------------------------------------------------------------------------- parts


def attn_case(name: str, backend: str, q, k, v, ref) -> None:
    times, out, _ = timed(lambda: BACKENDS[backend](q, k, v, None), warmup=2, reps=5)
    err = rel_err(out.float(), ref)
    ms = statistics.median(times) * 1e3
    flops = 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] * q.shape[3]
    record(name, ms=round(ms, 3), tflops=round(flops / ms / 1e9), rel_err_vs_fp32=f"{err:.2e}")
    if err > (1.5e-1 if backend in LOSSY or backend in FP8_VARIANTS else 2e-2):
        raise RuntimeError(f"{backend} error {err:.2e} too large")


def part_attn(args: argparse.Namespace, cfg: DiTConfig, device: str) -> str:
    """Each attention backend at the three DiT attention shapes; returns the fastest that runs all."""
    heads, d = cfg.num_heads, cfg.head_dim
    length = 21 * 28 * 56 if not args.tiny else 96
    shapes = {
        "self": ((1, length, heads, d), (1, length, heads, d)),
        "text": ((1, length, heads, d), (1, 512, heads, d)),
        "audio": ((21, length // 21, heads, d), (21, 64, heads, d)),
        "refmap": ((1, length, heads, d), (1, length // 21, heads, d)),
    }
    g = torch.Generator(device=device).manual_seed(2)
    totals: dict[str, float] = {}
    for shape_name, (qs, ks) in shapes.items():
        q = torch.randn(qs, generator=g, device=device).bfloat16()
        k = torch.randn(ks, generator=g, device=device).bfloat16()
        v = torch.randn(ks, generator=g, device=device).bfloat16()
        ref = attention(q.float(), k.float(), v.float(), backend="sdpa")
        lossy = ("flash3_fp8", *FP8_VARIANTS) if shape_name == "self" else ()
        for backend in ("sdpa", "flash", "cudnn", "efficient", "flash3", *lossy):
            name = f"attn/{shape_name}/{backend}"
            ms = float("inf")
            if guarded(name, lambda b=backend, n=name, q=q, k=k, v=v, r=ref: attn_case(n, b, q, k, v, r)):
                ms = RESULTS[name]["ms"] * (0 if shape_name == "refmap" else 1)
            totals[backend] = totals.get(backend, 0.0) + ms
        del q, k, v, ref
    usable = {b: t for b, t in totals.items() if t != float("inf") and b in EXACT}
    best = min(usable, key=usable.get) if usable else "sdpa"
    record("attn/choice", backend=best, totals_ms={b: round(t, 2) for b, t in totals.items()})
    return best


def forward_case(
    name: str,
    model: MultiTalkTransformer,
    inputs: dict,
    runtime: DiTRuntime,
    *,
    ref_key: str | None,
    store_key: str | None = None,
    warmup: int = 1,
    reps: int = 3,
) -> None:
    def run() -> None:
        peak_reset()
        with torch.no_grad():
            times, out, first = timed(lambda: model(**inputs, runtime=runtime), warmup, reps)
        fields: dict[str, object] = {
            "median_s": round(statistics.median(times), 4),
            "runs_s": [round(t, 4) for t in times],
            "first_call_s": round(first, 2),
            "peak_gib": round(peak_gib(), 2),
            "runtime": str(runtime),
        }
        finite = bool(torch.isfinite(out).all())
        fields["finite"] = finite
        if ref_key and ref_key in STORE:
            fields["rel_err_vs_ref"] = f"{rel_err(out, STORE[ref_key]):.3e}"
        if store_key:
            STORE[store_key] = out.detach().clone()
        record(name, **fields)

    guarded(name, run)


def part_dit(
    args, model, cfg, device, backend: str, tag: str, *, with_ref: bool, with_fast: bool, with_batched: bool
) -> None:
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    hw, frames = args.hw, args.frames
    reps = args.reps
    for persons in (2, 1):
        inputs = dit_inputs(cfg, hw, frames, 1, persons, device)
        if with_ref:
            forward_case(
                f"dit/ref/P{persons}",
                model,
                inputs,
                REFERENCE_RUNTIME,
                ref_key=None,
                store_key=f"P{persons}",
                reps=args.ref_reps,
            )
        if with_fast:
            forward_case(f"dit/fast-{tag}/P{persons}", model, inputs, fast, ref_key=f"P{persons}", reps=reps)
    if not with_batched:
        return
    # cond + drop_text of a two-person run batched (B=2) vs the same two passes one by one
    single = dit_inputs(cfg, hw, frames, 1, 2, device)
    neg = dit_inputs(cfg, hw, frames, 1, 2, device)["context"] * 0.5
    passes = {"cond": (single["context"], single["audio"]), "drop_text": (neg, single["audio"])}
    shared = {k: single[k] for k in ("latent", "timestep", "clip_fea", "y", "person_masks")}

    def batched() -> None:
        peak_reset()
        with torch.no_grad():
            times, out, first = timed(
                lambda: predict_passes(model, **shared, passes=passes, runtime=fast), 1, reps
            )
        record(
            f"dit/fast-{tag}/B2-P2-batched",
            median_s=round(statistics.median(times), 4),
            per_pass_s=round(statistics.median(times) / 2, 4),
            first_call_s=round(first, 2),
            peak_gib=round(peak_gib(), 2),
            rel_err_cond_vs_ref=f"{rel_err(out['cond'], STORE['P2']):.3e}" if "P2" in STORE else None,
        )

    guarded(f"dit/fast-{tag}/B2-P2-batched", batched)


def block_case(
    name: str, model, cfg, args, device, runtime: DiTRuntime, persons: int, batch: int = 1
) -> None:
    """Error of block 0 alone (on the embedded random inputs) against the eager reference block: the
    per-block error, without the 40-block amplification of random weights."""

    def run() -> None:
        inputs = dit_inputs(cfg, args.hw, args.frames, 1, persons, device)
        if batch > 1:  # identical rows: only the GEMM shapes change
            inputs = {k: v if k == "person_masks" else torch.cat([v] * batch) for k, v in inputs.items()}
        with torch.no_grad():
            bi = model.embed(**inputs)
            if runtime.fp32_rope:
                bi = replace(bi, rope_cos=bi.rope_cos.float(), rope_sin=bi.rope_sin.float())
            out = model.blocks[0](bi.tokens, bi, runtime=runtime)[:1].float()
        key = f"block0/P{persons}"
        fields: dict[str, object] = {"finite": bool(torch.isfinite(out).all())}
        if key in STORE:
            fields["rel_err_vs_ref_block"] = f"{rel_err(out, STORE[key]):.3e}"
        else:
            STORE[key] = out
            fields["stored"] = "reference block output"
        record(name, **fields)

    guarded(name, run)


def part_blockerr(args, model, cfg, device, backend: str, tag: str) -> None:
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    for persons in (2, 1):
        if f"block0/P{persons}" not in STORE:
            block_case(f"block0/ref/P{persons}", model, cfg, args, device, REFERENCE_RUNTIME, persons)
            block_case(
                f"block0/ref-B2-noise-floor/P{persons}",
                model,
                cfg,
                args,
                device,
                REFERENCE_RUNTIME,
                persons,
                2,
            )
        block_case(f"block0/{tag}/P{persons}", model, cfg, args, device, fast, persons)


def part_attn_fp8_split(args, cfg, device) -> None:
    """The fp8 self-attention in two halves at the DiT's self-attention shape: FA3's e4m3 kernel on inputs
    quantised beforehand, and the smoothing + quantisation alone (compiled, as inside a compiled block)."""
    from multitalk_worker.models.attention import _flash3_fp8_kernel
    from multitalk_worker.models.fp8_attention import _descale, _quantize

    length, heads, d = 21 * 28 * 56, cfg.num_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, length, heads, d, generator=g, device=device).bfloat16() for _ in range(3))

    def prep(q, k, v):
        kf = k.float() - k.float().mean(dim=1, keepdim=True)
        vf = v.float() - v.float().mean(dim=1, keepdim=True)
        qf = q.float()
        dq, dk, dv = _descale(qf), _descale(kf), _descale(vf)
        return _quantize(qf, dq), _quantize(kf, dk), _quantize(vf, dv), dq, dk, dv

    prep_c = torch.compile(prep, dynamic=False)
    q8, k8, v8, dq, dk, dv = prep_c(q, k, v)

    def kernel() -> None:
        times, _, _ = timed(lambda: _flash3_fp8_kernel(q8, k8, v8, d**-0.5, dq, dk, dv), 2, 5)
        ms = statistics.median(times) * 1e3
        record("attn-fp8-split/kernel", ms=round(ms, 3), tflops=round(4 * length**2 * heads * d / ms / 1e9))

    def quant() -> None:
        times, _, _ = timed(lambda: prep_c(q, k, v), 2, 5)
        record("attn-fp8-split/prep-compiled", ms=round(statistics.median(times) * 1e3, 3))

    guarded("attn-fp8-split/kernel", kernel)
    guarded("attn-fp8-split/prep-compiled", quant)


def lossy_runtimes(backend: str) -> dict[str, DiTRuntime]:
    """The fp8 self-attention runtimes compared in the error parts (the exact sites keep `backend`)."""
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    runtimes = {
        f"fp8attn-{name}": replace(fast, self_attention_backend=name)
        for name in ("flash3_fp8", *FP8_VARIANTS)
    }
    runtimes["fp8attn-flash3_fp8-exact4"] = replace(
        fast, self_attention_backend="flash3_fp8", exact_self_attention_blocks=4
    )
    return runtimes


def part_fp8attn_blockerr(args, model, cfg, device, backend: str, prefix: str = "") -> None:
    """Block 0's error with each fp8 self-attention variant (the per-block yardstick of the error table)."""
    for tag, runtime in lossy_runtimes(backend).items():
        if runtime.exact_self_attention_blocks == 0:
            for persons in (2, 1):
                block_case(f"block0/{prefix}{tag}/P{persons}", model, cfg, args, device, runtime, persons)


def part_fp8_variants(args, model, cfg, device, backend: str) -> None:
    """40-block P2 error of the fp8 linears with each fp8 self-attention variant, run eagerly (compiled
    blocks would compile one graph per variant): `torch.compiler.set_stance("force_eager")`."""
    inputs = dit_inputs(cfg, args.hw, args.frames, 1, 2, device)
    runtimes = {"exact": replace(FAST_RUNTIME, attention_backend=backend), **lossy_runtimes(backend)}
    with torch.compiler.set_stance("force_eager"):
        for tag, runtime in runtimes.items():
            forward_case(f"dit/fp8-eager-{tag}/P2", model, inputs, runtime, ref_key="P2", warmup=1, reps=1)
        part_fp8attn_blockerr(args, model, cfg, device, backend, prefix="fp8lin-")


def part_fp8_tier(args, model, cfg, device, backend: str) -> None:
    """The fp8 tier as the engine runs it: fp8 linears + the fp8 self-attention, compiled blocks."""
    tier = replace(FAST_RUNTIME, attention_backend=backend, self_attention_backend="flash3_fp8")
    for persons in (2, 1):
        inputs = dit_inputs(cfg, args.hw, args.frames, 1, persons, device)
        forward_case(
            f"dit/fp8-tier-compiled/P{persons}", model, inputs, tier, ref_key=f"P{persons}", reps=args.reps
        )


def part_noise(args, model, cfg, device) -> None:
    """Full forward, reference path, the same P=2 inputs as a batch of 2 identical rows vs batch 1."""

    def run() -> None:
        inputs = dit_inputs(cfg, args.hw, args.frames, 1, 2, device)
        inputs = {k: v if k == "person_masks" else torch.cat([v, v]) for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**inputs)[:1]
        record("dit/ref-B2-noise-floor/P2", rel_err_vs_ref=f"{rel_err(out, STORE['P2']):.3e}")

    guarded("dit/ref-B2-noise-floor/P2", run)


def part_attn2(args, cfg, device) -> None:
    """Self-attention shape: cuDNN on contiguous [B, H, L, D] inputs, and an FP8 SDPA attempt."""
    length, heads, d = 21 * 28 * 56, cfg.num_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, heads, length, d, generator=g, device=device).bfloat16() for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bhld(kernel) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with sdpa_kernel(kernel):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return fn

    for name, kernel in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):

        def case(name: str = name, kernel=kernel) -> None:
            times, out, _ = timed(bhld(kernel), 2, 5)
            ms = statistics.median(times) * 1e3
            tflops = 4 * length * length * heads * d / (ms * 1e-3) / 1e12
            record(
                f"attn2/self-bhld/{name}",
                ms=round(ms, 3),
                tflops=round(tflops),
                err=f"{rel_err(out.float(), ref):.2e}",
            )

        guarded(f"attn2/self-bhld/{name}", case)

    def fp8() -> None:
        f8 = torch.float8_e4m3fn
        times, out, _ = timed(
            lambda: torch.nn.functional.scaled_dot_product_attention(q.to(f8), k.to(f8), v.to(f8)), 1, 3
        )
        record(
            "attn2/self-fp8-sdpa",
            ms=round(statistics.median(times) * 1e3, 3),
            err=f"{rel_err(out.float(), ref):.2e}",
        )

    guarded("attn2/self-fp8-sdpa", fp8)

    def matmul() -> None:
        a = torch.randn(32928, 5120, generator=g, device=device).bfloat16()
        b = torch.randn(13824, 5120, generator=g, device=device).bfloat16()
        times, _, _ = timed(lambda: a @ b.t(), 3, 10)
        ms = statistics.median(times) * 1e3
        record("gemm/bf16-ffn1", ms=round(ms, 3), tflops=round(2 * 32928 * 5120 * 13824 / (ms * 1e-3) / 1e12))

    guarded("gemm/bf16-ffn1", matmul)


def part_720p(args, model, cfg, device, backend: str, tag: str) -> None:
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    inputs = dit_inputs(cfg, (960, 960) if not args.tiny else (64, 64), args.frames, 1, 2, device)
    forward_case(f"dit720/fast-{tag}/P2", model, inputs, fast, ref_key=None, reps=2)


def part_ref_720p(args, model, cfg, device) -> None:
    """The reference path at 720p (run before `compile`, which changes the blocks in place)."""
    inputs = dit_inputs(cfg, (960, 960) if not args.tiny else (64, 64), args.frames, 1, 2, device)
    forward_case("dit720/ref/P2", model, inputs, REFERENCE_RUNTIME, ref_key=None, reps=args.ref_reps)


def part_profile(
    args, model, cfg, device, backend: str, runtime: DiTRuntime | None = None, name: str = "profile.txt"
) -> None:
    """GPU kernel time of one fast-path forward (P2), grouped by kernel; the top 40 go to `name`."""
    from torch.profiler import ProfilerActivity, profile

    fast = runtime or replace(FAST_RUNTIME, attention_backend=backend)
    inputs = dit_inputs(cfg, args.hw, args.frames, 1, 2, device)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with torch.no_grad():
        model(**inputs, runtime=fast)  # warm (compiles when the blocks are compiled)
        sync()
        with profile(activities=activities) as prof:
            model(**inputs, runtime=fast)
            sync()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=100)
    (args.out / name).write_text(table)
    print(table)


def part_fp8(args, model, cfg, device, backend: str, compiled: bool, compile_after: bool) -> None:
    from multitalk_worker.models.fp8 import quantize_block_linears_fp8

    def convert() -> None:
        t0 = time.perf_counter()
        count = quantize_block_linears_fp8(model)
        sync()
        record(
            "fp8/convert",
            linears=count,
            seconds=round(time.perf_counter() - t0, 2),
            weights_gib=round(torch.cuda.memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None,
        )

    if not guarded("fp8/convert", convert):
        return
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    tags = ["compiled"] if compiled else (["eager", "compiled"] if compile_after else ["eager"])
    for tag in tags:
        if tag == "compiled" and not compiled:
            exact = not args.no_exact_casts
            guarded(
                "fp8/compile",
                lambda e=exact: record("fp8/compile", blocks=compile_blocks(model, exact_casts=e)),
            )
        for persons in (2, 1):
            inputs = dit_inputs(cfg, args.hw, args.frames, 1, persons, device)
            reps = args.reps if tag == "compiled" else 2
            forward_case(f"dit/fp8-{tag}/P{persons}", model, inputs, fast, ref_key=f"P{persons}", reps=reps)
            block_case(f"block0/fp8-{tag}/P{persons}", model, cfg, args, device, fast, persons)


def build_vae(vcfg: VAEConfig, device: str):
    from multitalk_worker.models.vae import build_vae as build

    torch.manual_seed(0)
    return build(vcfg).to(device)


def part_vae(args, vcfg: VAEConfig, device: str) -> None:
    from multitalk_worker.models.vae import vae_decode, vae_encode
    from multitalk_worker.models.vae_fast import VAERuntime, prepare_vae

    g = torch.Generator(device=device).manual_seed(3)
    hw, frames = args.hw, args.frames
    video = torch.rand(1, 3, 4 * (frames - 1) + 1, hw[0], hw[1], generator=g, device=device) * 2 - 1
    latents = torch.randn(1, vcfg.z_dim, frames, hw[0] // 8, hw[1] // 8, generator=g, device=device)
    variants = {
        "fp32": VAERuntime(),
        "fp32-cl": VAERuntime(channels_last=True),
        "bf16": VAERuntime(dtype=torch.bfloat16),
        "bf16-cl": VAERuntime(dtype=torch.bfloat16, channels_last=True),
        "bf16-cl-bench": VAERuntime(dtype=torch.bfloat16, channels_last=True, cudnn_benchmark=True),
        "fp32-cl-compiled": VAERuntime(channels_last=True, compile_blocks=True),
        "bf16-cl-compiled": VAERuntime(dtype=torch.bfloat16, channels_last=True, compile_blocks=True),
    }
    variants = {k: v for k, v in variants.items() if k in args.vae_variants.split(",")}
    ref: dict[str, torch.Tensor] = {}
    for name, rt in variants.items():

        def case(name: str = name, rt: VAERuntime = rt) -> None:
            vae = prepare_vae(build_vae(vcfg, device), rt)
            peak_reset()
            enc_t, enc, _ = timed(lambda: vae_encode(vae, video), 1, args.vae_reps)
            dec_t, dec, _ = timed(lambda: vae_decode(vae, latents), 1, args.vae_reps)
            fields = {
                "encode_s": round(statistics.median(enc_t), 3),
                "decode_s": round(statistics.median(dec_t), 3),
                "peak_gib": round(peak_gib(), 2),
            }
            if name == "fp32":
                ref["enc"], ref["dec"] = enc, dec
            else:
                fields["encode_rel_err"] = f"{rel_err(enc, ref['enc']):.2e}"
                fields["decode_rel_err"] = f"{rel_err(dec, ref['dec']):.2e}"
                fields["decode_max_abs"] = f"{(dec - ref['dec']).abs().max().item():.3e}"
            record(f"vae/{name}", **fields)

        guarded(f"vae/{name}", case)


def part_clip(args, model, cfg, vcfg, device, backend: str, preset: str, label: str = "clip") -> None:
    """One 81-frame clip, DiT + VAE decode: steps × guidance passes with the fast runtime."""
    from multitalk_worker.models.vae import vae_decode
    from multitalk_worker.models.vae_fast import FAST_VAE_RUNTIME, prepare_vae
    from multitalk_worker.pipeline.sampling import cfg_combine, euler_step, shifted_timesteps

    steps, text_scale, audio_scale, shift = {
        "fast": (args.fast_steps, 1.0, 2.0, 2.0),
        "default": (args.clip_steps, 5.0, 4.0, 7.0),
    }[preset]
    fast = replace(FAST_RUNTIME, attention_backend=backend)
    base = dit_inputs(cfg, args.hw, args.frames, 1, 2, device)
    silent = torch.zeros_like(base["audio"])[:, -1:]
    neg = base["context"] * 0.5
    if text_scale == 1.0:
        passes = {"cond": (base["context"], base["audio"]), "drop_audio": (base["context"], silent)}
    else:
        passes = {
            "cond": (base["context"], base["audio"]),
            "drop_text": (neg, base["audio"]),
            "uncond": (neg, silent),
        }
    shared = {k: base[k] for k in ("clip_fea", "y", "person_masks")}
    vae = prepare_vae(build_vae(vcfg, device), FAST_VAE_RUNTIME)

    def run() -> None:
        peak_reset()
        sync()
        t0 = time.perf_counter()
        latent = base["latent"]
        schedule = shifted_timesteps(steps, shift).to(device)
        with torch.no_grad():
            for step in range(steps):
                t = schedule[step : step + 1]
                preds = predict_passes(model, latent, t, **shared, passes=passes, runtime=fast)
                velocity = cfg_combine(preds, text_scale, audio_scale)
                latent = euler_step(latent, velocity, schedule[step], schedule[step + 1])
            sync()
            t_dit = time.perf_counter() - t0
            video = vae_decode(vae, latent)
        sync()
        total = time.perf_counter() - t0
        record(
            f"{label}/{preset}",
            steps=steps,
            passes_per_step=len(passes),
            dit_s=round(t_dit, 2),
            vae_decode_s=round(total - t_dit, 2),
            total_s=round(total, 2),
            peak_gib=round(peak_gib(), 2),
            frames=int(video.shape[2]),
            finite=bool(torch.isfinite(video).all()),
        )

    guarded(f"{label}/{preset}", run)


# ----------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = str(torch.backends.cudnn.version())
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia-smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib import metadata

    for dist in ("fa3-fwd", "flash-attn-4"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    for mod in ("diffusers", "torchao", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "not importable"
    return info


def table() -> str:
    lines = [f"{'case':40s} result"]
    for name, fields in RESULTS.items():
        keep = {k: v for k, v in fields.items() if k not in ("runs_s", "runtime", "totals_ms")}
        lines.append(f"{name:40s} {json.dumps(keep)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--parts",
        default="attn,dit,compile,720p,clip,vae,fp8",
        help="attn attn2 dit refstore blockerr fp8attn-blockerr noise ref-720p compile batched profile clip "
        "clip-fast clip-default 720p vae fp8 fp8-compile fp8-variants fp8-tier fp8-tier-profile "
        "fp8-tier-720p attn-fp8-split compile-only fp8-convert-only fp8-clip fp8-720p",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny config on the CPU (smoke test of this script)"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ref-reps", type=int, default=3)
    parser.add_argument(
        "--no-exact-casts", action="store_true", help="compile without emulate_precision_casts"
    )
    parser.add_argument("--vae-reps", type=int, default=2)
    parser.add_argument(
        "--vae-variants", default="fp32,fp32-cl,bf16,bf16-cl,fp32-cl-compiled,bf16-cl-compiled"
    )
    parser.add_argument("--clip-steps", type=int, default=40, help="steps of the default-preset clip")
    parser.add_argument("--fast-steps", type=int, default=4, help="steps of the fast-preset clip")
    parser.add_argument(
        "--backend", default=None, help="attention backend of the fast path (default: fastest)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    for key in (
        "cache_size_limit",
        "recompile_limit",
        "accumulated_cache_size_limit",
        "accumulated_recompile_limit",
    ):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 256)
    args.out.mkdir(parents=True, exist_ok=True)
    OUT_FILE.append(args.out / "partial.json")
    parts = args.parts.split(",")
    device = "cpu" if args.tiny else "cuda"
    cfg = TINY.dit if args.tiny else WAN_14B_480P.dit
    vcfg = TINY.vae if args.tiny else WAN_14B_480P.vae
    args.hw, args.frames = ((64, 128), 3) if args.tiny else ((448, 896), 21)
    meta = {"argv": sys.argv, "versions": versions()}

    register_fp8_variants()
    backend = args.backend or "sdpa"
    if "attn" in parts and not args.tiny:
        best = part_attn(args, cfg, device)
        backend = args.backend or best
    model = None
    if any(p not in ("attn", "attn2", "attn-fp8-split", "vae") for p in parts):
        t0 = time.perf_counter()
        model = build_dit(cfg, device)
        sync()
        record(
            "startup",
            build_and_init_s=round(time.perf_counter() - t0, 2),
            process_start_to_ready_s=round(time.perf_counter() - T_START, 2),
            weights_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else None,
            note="random init on the GPU; no checkpoint read",
        )
    compiled = False
    if "attn2" in parts and not args.tiny:
        part_attn2(args, cfg, device)
    if "attn-fp8-split" in parts and not args.tiny:
        part_attn_fp8_split(args, cfg, device)
    if "dit" in parts:
        part_dit(args, model, cfg, device, backend, "eager", with_ref=True, with_fast=True, with_batched=True)
    if "refstore" in parts:
        part_dit(
            args, model, cfg, device, backend, "eager", with_ref=True, with_fast=False, with_batched=False
        )
    if "blockerr" in parts:
        part_blockerr(args, model, cfg, device, backend, "fast-eager")
    if "fp8attn-blockerr" in parts:
        part_fp8attn_blockerr(args, model, cfg, device, backend)
    if "noise" in parts:
        part_noise(args, model, cfg, device)
    if "ref-720p" in parts:
        part_ref_720p(args, model, cfg, device)
    if "compile" in parts:
        exact = not args.no_exact_casts
        guarded(
            "compile/blocks",
            lambda: record(
                "compile/blocks", blocks=compile_blocks(model, exact_casts=exact), exact_casts=exact
            ),
        )
        compiled = True
        part_dit(
            args,
            model,
            cfg,
            device,
            backend,
            "compiled",
            with_ref=False,
            with_fast=True,
            with_batched="batched" in parts,
        )
        if "blockerr" in parts:
            part_blockerr(args, model, cfg, device, backend, "fast-compiled")
    if "compile-only" in parts:  # compiled blocks for the parts below, nothing timed here
        compile_blocks(model, exact_casts=not args.no_exact_casts)
        compiled = True
    if "clip" in parts or "clip-fast" in parts:
        part_clip(args, model, cfg, vcfg, device, backend, "fast")
    if "clip" in parts or "clip-default" in parts:
        part_clip(args, model, cfg, vcfg, device, backend, "default")
    if "profile" in parts:
        part_profile(args, model, cfg, device, backend)
    if "720p" in parts:
        part_720p(args, model, cfg, device, backend, "compiled" if compiled else "eager")
    if "vae" in parts:
        part_vae(args, vcfg, device)
    if "fp8-convert-only" in parts:
        from multitalk_worker.models.fp8 import quantize_block_linears_fp8

        quantize_block_linears_fp8(model)
    if "fp8" in parts:
        part_fp8(args, model, cfg, device, backend, compiled, compile_after="fp8-compile" in parts)
    if "fp8-variants" in parts:
        part_fp8_variants(args, model, cfg, device, backend)
    if "fp8-tier" in parts:
        part_fp8_tier(args, model, cfg, device, backend)
    tier = replace(FAST_RUNTIME, attention_backend=backend, self_attention_backend="flash3_fp8")
    if "fp8-tier-profile" in parts:
        guarded(
            "profile/fp8-tier",
            lambda: part_profile(
                args, model, cfg, device, backend, runtime=tier, name="profile-fp8-tier.txt"
            ),
        )
    if "fp8-tier-720p" in parts:
        inputs = dit_inputs(cfg, (960, 960) if not args.tiny else (64, 64), args.frames, 1, 2, device)
        forward_case("dit720/fp8-tier-compiled/P2", model, inputs, tier, ref_key=None, reps=2)
    if "fp8-clip" in parts:
        part_clip(args, model, cfg, vcfg, device, backend, "fast", label="clip-fp8")
    if "fp8-720p" in parts:
        part_720p(args, model, cfg, device, backend, "fp8-compiled" if compiled else "fp8-eager")
    meta["results"] = RESULTS
    meta["total_s"] = round(time.perf_counter() - T_START, 1)
    (args.out / "results.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta["versions"]))
    print(table())
    print(f"total {meta['total_s']} s")


if __name__ == "__main__":
    main()
