"""One LongCat-Video-Avatar DiT forward on one GPU: our reference path, our fast engine, our fp8 tier and the
reference code's own DiT, in one process, on the same random weights and inputs (issue #20).

    python bench/bench_longcat_dit.py --out DIR --reference LONGCAT_VIDEO_CHECKOUT [--version 1.5|1.0]
        [--persons 1|2] [--task ai2v|continuation] [--parts ours-ref,reference,ours-fast,ours-fp8]
        [--reference-attention auto|flash_attn|flash3|sdpa] [--reps 3] [--fp8-adaln] [--no-compile] [--tiny]

The full-size DiT (v1.5 `base_model/config.json`: 48 blocks of width 4096, 15 852 916 800 parameters) is built
on the meta device and materialised on the GPU in bf16 with random weights (no float32 copy, no checkpoint
read). Inputs are the default avatar task's first-segment call (image-to-video, spec §3.2, §6.6, §7.4): the
480x832 bucket, one 93-frame segment = 24 latents [1, 16, 24, 60, 104] with latent 0 clean (timestep 0) and
23 noisy ones at t = 920, 24 x 1560 = 37 440 tokens; 512 umT5 positions [1, 512, 4096] (120 valid); per-frame
audio windows [P, 93, 5, 5, 1280] (v1.0: 12 x 768); with --persons 2 two audio streams and person masks.
`--task continuation` times the call most segments of a long video make instead (spec §7.6): the 20 noisy
latents (31 200 queries) over the cached keys of the reference and 4 conditioning latents (39 000 keys),
reference at RoPE time 10, masked band 3; each model's cache pass runs once beforehand, untimed (ours on
the reference path, shared by our parts).

Parts (run in this order whatever the order given):
  ours-ref   our DiT, reference path (eager, "sdpa"): the output every other part is compared with
  reference  the checkout's `LongCatVideoAvatarTransformer3DModel`, built on the meta device and given OUR
             weight tensors under the published key names (`load_state_dict(assign=True)`: one copy of the
             weights); its attention (--reference-attention): flash_attn when importable (FlashAttention-2,
             the published config), else a stand-in `flash_attn` module calling our "flash3"
             (FlashAttention-3, fa3-fwd) where it passes its probe on a Hopper GPU, else SDPA. Freed after
             its part.
  ours-fast  the `fast` engine (pipeline/engine.py): FAST_RUNTIME, attention "auto" (FA3 where importable),
             each block compiled (models/runtime.compile_blocks); the first call pays the compilation
  ours-fp8   the fp8 tier on top: float8 block linears (models/fp8.py; the float32 adaLN linears kept, unless
             --fp8-adaln) and the fp8 self-attention where it passes its probe; before converting the model,
             block 0 alone is compared in both fp8 variants (adaLN kept / converted)
Each part: median forward seconds over --reps after one warm-up call, the first call's seconds, peak
allocated GiB (weights included) and max |out - ours-ref| and ||out - ours-ref|| / ||ours-ref|| of the float32
prediction. Writes DIR/results.json (rewritten after every part) and prints one table last.

--tiny runs the wiring on the CPU: the parity tool's tiny config (tests/tiny_longcat.py), 64x64 pixels, the
same 24 latents, the reference DiT through tools/_parity_longcat_reference.py (CUDA autocast emulated, SDPA
for flash_attn, torch.compile off), no fp8 (it needs a CUDA GPU).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO / "bench", REPO / "tools", REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench import peak_gib, peak_reset, sync, timed, versions  # noqa: E402
from multitalk_worker.models.attention import BACKENDS, AttentionBackendUnavailable, probe_backend  # noqa: E402
from multitalk_worker.models.fp8 import FP32_LINEARS, quantize_block_linears_fp8  # noqa: E402
from multitalk_worker.models.longcat.config import (  # noqa: E402
    LONGCAT_AVATAR_10,
    LONGCAT_AVATAR_15,
    LongCatAvatarConfig,
)
from multitalk_worker.models.longcat.transformer import Conditioning, LongCatAvatarTransformer  # noqa: E402
from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime, compile_blocks  # noqa: E402
from multitalk_worker.pipeline.engine import engine_options, resolve_engine  # noqa: E402
from multitalk_worker.tiny import shape_noise  # noqa: E402

log = logging.getLogger("bench_longcat_dit")

PARTS = ("ours-ref", "reference", "ours-fast", "ours-fp8")
SEGMENT_FRAMES = 93  # one segment (spec §6.6): 24 latents
TIMESTEP = 920.0  # a distilled step's timestep as the DiT sees it (bf16-exact, spec §7.2)
TEXT_VALID = 120  # valid umT5 tokens of the prompt (all 512 positions are keys with text_tokens_zero_pad)
# Conditioning of the benchmarked call (spec §3.7, §7.6): ai2v's clean image latent; a continuation's cache of
# the reference latent (at RoPE time 10) and 4 conditioning latents, masked band ±3 (the demos' defaults).
TASKS = {
    "ai2v": Conditioning(num_cond_latents=1),
    "continuation": Conditioning(num_cond_latents=5, num_ref_latents=1, ref_img_index=10, mask_frame_range=3),
}


@dataclass
class Bench:
    """State of one run: where results go and what every row states."""

    out: Path
    device: torch.device
    meta: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: torch.Tensor | None = None

    def record(self, name: str, **fields: Any) -> None:
        self.results[name] = fields
        log.info("%s: %s", name, fields)
        self.meta["results"] = self.results
        (self.out / "results.json").write_text(json.dumps(self.meta, indent=1))

    def guarded(self, name: str, fn: Callable[[], None]) -> bool:
        """Run one part; a failure is recorded with its reason and the run goes on."""
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - a bench records failures and continues
            self.record(name, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            traceback.print_exc()
            return False
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- model and inputs


def tiny_config(version: str) -> LongCatAvatarConfig:
    from tiny_longcat import TINY_10, TINY_15

    return LongCatAvatarConfig.from_dict(TINY_15 if version == "1.5" else TINY_10)


@torch.no_grad()
def build_ours(cfg: LongCatAvatarConfig, device: torch.device) -> LongCatAvatarTransformer:
    """Meta build in bf16, uninitialised storage on `device`, then seeded weights tensor by tensor by the
    tiny models' rule (multitalk_worker.tiny.shape_noise): no float32 copy of the model."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LongCatAvatarTransformer(cfg)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
        param.copy_(shape_noise(name, noise))
        del noise
    return model.eval().requires_grad_(False)


def make_inputs(
    cfg: LongCatAvatarConfig, hw: tuple[int, int], persons: int, task: str, device: torch.device
) -> dict:
    """Seeded inputs of one call at `hw` pixels (latent = pixels / 8). ai2v: the first segment's 24 latents,
    latent 0 clean; continuation: the 20 noisy latents, and the 5 clean ones (reference + 4 conditioning)
    that the untimed cache pass turns into keys and values (spec §7.6)."""
    g = torch.Generator(device=device).manual_seed(1)
    h, w = hw[0] // 8, hw[1] // 8
    latents = (SEGMENT_FRAMES - 1) // cfg.vae_scale + 1
    cond = TASKS[task]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device) * scale

    text_len = cfg.model_max_length
    mask = torch.zeros(1, text_len, dtype=torch.int64, device=device)
    mask[:, : min(TEXT_VALID, text_len - 2)] = 1
    inputs = {
        "cond": cond,
        "text": rnd(1, text_len, cfg.caption_channels, scale=0.2).bfloat16(),
        "text_mask": mask,
        "audio": rnd(
            persons, SEGMENT_FRAMES, cfg.audio_window, cfg.audio_block, cfg.audio_channel, scale=0.5
        ).bfloat16(),
        "person_masks": None,
    }
    if task == "ai2v":
        inputs["latent"] = rnd(1, cfg.in_channels, latents, h, w)
        inputs["timestep"] = torch.full((1, latents), TIMESTEP, device=device)
        inputs["timestep"][:, : cond.num_cond_latents] = 0.0
    else:  # the noisy latents of the segment after the 4 conditioning ones
        noisy = latents - (cond.num_cond_latents - cond.num_ref_latents)
        inputs["latent"] = rnd(1, cfg.in_channels, noisy, h, w)
        inputs["timestep"] = torch.full((1, noisy), TIMESTEP, device=device)
        inputs["clean"] = rnd(1, cfg.in_channels, cond.num_cond_latents, h, w)
    if persons == 2:  # person 1 left, person 2 right, background the rest (pixels)
        masks = torch.zeros(3, hw[0], hw[1], device=device)
        masks[0, hw[0] // 8 :, : hw[1] // 2 - hw[1] // 16] = 1
        masks[1, hw[0] // 8 :, hw[1] // 2 + hw[1] // 16 :] = 1
        masks[2] = (masks[0] + masks[1] == 0).float()
        inputs["person_masks"] = masks
    return inputs


@torch.no_grad()
def our_cache(model: LongCatAvatarTransformer, inputs: dict) -> list | None:
    """A continuation's cache pass on the clean latents (reference path; untimed), or None for ai2v."""
    if "clean" not in inputs:
        return None
    text = torch.zeros_like(inputs["text"])
    return model.clean_cache(inputs["clean"], text, inputs["audio"], cond=inputs["cond"])


def run_ours(model: LongCatAvatarTransformer, inputs: dict, runtime: DiTRuntime) -> torch.Tensor:
    return model(
        inputs["latent"],
        inputs["timestep"],
        inputs["text"],
        inputs["text_mask"],
        inputs["audio"],
        cond=inputs["cond"],
        person_masks=inputs["person_masks"],
        kv_cache=inputs.get("kv_cache"),
        runtime=runtime,
    )


def reference_conditioning(cond: Conditioning) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_cond_latents": cond.num_cond_latents}
    if cond.num_ref_latents:
        kwargs |= {"num_ref_latents": cond.num_ref_latents, "ref_img_index": cond.ref_img_index}
    return kwargs


@torch.no_grad()
def reference_cache(model: torch.nn.Module, inputs: dict) -> dict:
    """The reference's own cache pass (return_kv, skip_crs_attn, zero text), as its pipeline runs it."""
    if "clean" not in inputs:
        return {}
    _, cache = model(
        hidden_states=inputs["clean"],
        timestep=torch.zeros(1, device=inputs["clean"].device),
        encoder_hidden_states=torch.zeros_like(inputs["text"][:, None]),
        return_kv=True,
        skip_crs_attn=True,
        audio_embs=inputs["audio"],
        **reference_conditioning(inputs["cond"]),
    )
    return cache


def run_reference(model: torch.nn.Module, inputs: dict, cache: dict) -> torch.Tensor:
    """The checkout's DiT called as its pipeline calls it (spec §3.2, §7.6; as the parity tool does)."""
    return model(
        hidden_states=inputs["latent"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["text"][:, None],
        encoder_attention_mask=inputs["text_mask"],
        audio_embs=inputs["audio"],
        kv_cache_dict=cache,
        mask_frame_range=inputs["cond"].mask_frame_range,
        ref_target_masks=inputs["person_masks"],
        **reference_conditioning(inputs["cond"]),
    )


# ----------------------------------------------------------------------------- the reference DiT


def _module(name: str, **attrs: Any) -> types.ModuleType:
    from _parity_longcat_reference import _module as make

    return make(name, **attrs)


def _flash_attn_standin(backend: str) -> types.ModuleType:
    """A `flash_attn` module with flash-attn's [B, S, H, D] contract computed by our backend `backend`."""
    attend = BACKENDS[backend]

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):  # noqa: ANN001, ANN202
        return attend(q, k, v, softmax_scale)

    def flash_attn_varlen_func(  # noqa: ANN202
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=None,
        **_,  # noqa: ANN001
    ):
        if len(cu_seqlens_q) == 2:  # one item (batch 1): no host sync
            return attend(q[None], k[None], v[None], softmax_scale)[0]
        qb, kb = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        parts = [
            attend(q[None, qb[i] : qb[i + 1]], k[None, kb[i] : kb[i + 1]], v[None, kb[i] : kb[i + 1]],
                   softmax_scale)[0]
            for i in range(len(qb) - 1)
        ]  # fmt: skip
        return torch.cat(parts)

    return _module(
        "flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func
    )


def _choose_reference_attention(choice: str, device: torch.device) -> str:
    """ "flash_attn" (the real package), "flash3" or "sdpa" (our backends behind a stand-in flash_attn)."""
    if choice != "auto":
        return choice
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    if torch.cuda.get_device_capability(device)[0] == 9:
        try:
            probe_backend("flash3", device)
            return "flash3"
        except AttentionBackendUnavailable as exc:
            log.info("reference attention: flash3 unavailable (%s); SDPA", exc)
    return "sdpa"


# Modules `longcat_video.audio_process.torch_utils` imports at its top for audio and video file work; the
# DiT uses none of them. Where one is not installed an empty module stands in (attributes as imported).
IMPORT_ONLY = {"torchvision": {}, "librosa": {}, "pyloudnorm": {}, "imageio": {}, "tqdm": {"tqdm": None}}


def load_reference_module(checkout: Path, device: torch.device, choice: str) -> tuple[types.ModuleType, str]:
    """The checkout's DiT module and the attention label. On the CPU: tools/_parity_longcat_reference.py's
    loader (CUDA autocast emulated). On a GPU: imported as it is (real autocast, real torch.compile of its
    reference-map function), with stand-ins only for what it cannot import here: block-sparse attention
    (off in every published config), the audio package's __init__ (wav2vec2/Whisper wrappers), absent
    import-only modules (IMPORT_ONLY) and, without flash-attn, `flash_attn` itself."""
    from _parity_longcat_reference import DIT_MODULE, PACKAGE, _bsa_unavailable, load_reference_dit

    if device.type == "cpu":
        label = "sdpa (stand-in flash_attn; CPU, CUDA autocast emulated, torch.compile off)"
        return load_reference_dit(checkout), label
    checkout = checkout.resolve()
    if not (checkout / PACKAGE / "modules" / "avatar" / "longcat_video_dit_avatar.py").is_file():
        raise SystemExit(f"{checkout} is not a LongCat-Video checkout (no {PACKAGE}/modules/avatar/)")
    sys.path.insert(0, str(checkout))
    importlib.import_module(
        "diffusers.models.modeling_utils"
    )  # it probes optional packages: before stand-ins
    attention = _choose_reference_attention(choice, device)
    if attention == "flash_attn":
        flash = importlib.import_module("flash_attn")
        label = f"flash_attn {getattr(flash, '__version__', '?')} (FlashAttention-2, the published config)"
    else:
        sys.modules["flash_attn"] = _flash_attn_standin(attention)
        label = {
            "flash3": "FlashAttention-3 (fa3-fwd, our 'flash3') behind a stand-in flash_attn",
            "sdpa": "SDPA (PyTorch's kernel choice) behind a stand-in flash_attn",
        }[attention]
    stood_in = []
    for name, attrs in IMPORT_ONLY.items():
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _module(name, **attrs)
            stood_in.append(name)
    if importlib.util.find_spec("scipy") is None:
        signal = _module("scipy.signal")
        sys.modules["scipy"], sys.modules["scipy.signal"] = _module("scipy", signal=signal), signal
        stood_in.append("scipy")
    bare = f"{PACKAGE}.audio_process"
    package = _module(bare)
    package.__path__ = [str(checkout / PACKAGE / "audio_process")]
    sys.modules[bare] = package
    bsa = f"{PACKAGE}.block_sparse_attention.bsa_interface"
    sys.modules[bsa] = _module(bsa, flash_attn_bsa_3d=_bsa_unavailable)
    module = importlib.import_module(DIT_MODULE)
    if stood_in:
        label += f"; empty stand-ins for {', '.join(stood_in)}"
    return module, label


def build_reference(
    dit: types.ModuleType, cfg: LongCatAvatarConfig, ours: torch.nn.Module
) -> torch.nn.Module:
    """The checkout's DiT on the meta device, then OUR tensors assigned under the published key names."""
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in ("_class_name", "model_max_length")}
    kwargs |= {"enable_flashattn2": True, "cp_split_hw": [1, 1]}
    with torch.device("meta"):
        model = dit.LongCatVideoAvatarTransformer3DModel(**kwargs)
    model.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- parts


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    d = out.double() - ref.double()
    return {
        "max_abs_vs_ours_ref": float(f"{d.abs().max().item():.3e}"),
        "rel_err_vs_ours_ref": float(f"{(d.norm() / ref.double().norm()).item():.3e}"),
    }


def measure(
    bench: Bench, name: str, fn: Callable[[], torch.Tensor], reps: int, attention: str, **extra: Any
) -> torch.Tensor:
    """Time fn (one warm-up call, then `reps`), record it; returns the last output."""
    peak_reset()
    before = torch.cuda.memory_allocated() / 2**30 if bench.device.type == "cuda" else float("nan")
    with torch.no_grad():
        times, out, first = timed(fn, 1, reps)
    fields: dict[str, Any] = {
        "median_s": round(statistics.median(times), 4),
        "runs_s": [round(t, 4) for t in times],
        "first_call_s": round(first, 2),
        "peak_gib": round(peak_gib(), 2),
        "resident_before_gib": round(before, 2),
        "attention": attention,
        "device": bench.meta["device"],
        "torch": torch.__version__,
        "finite": bool(torch.isfinite(out).all()),
        **extra,
    }
    if bench.baseline is not None:
        fields |= errors(out, bench.baseline)
    bench.record(name, **fields)
    return out


def part_ours_ref(bench: Bench, model: LongCatAvatarTransformer, inputs: dict, reps: int) -> None:
    out = measure(
        bench,
        "ours-ref",
        lambda: run_ours(model, inputs, REFERENCE_RUNTIME),
        reps,
        "sdpa",
        runtime="reference",
    )
    bench.baseline = out.detach().clone()


def part_reference(
    bench: Bench, model: LongCatAvatarTransformer, inputs: dict, args: argparse.Namespace
) -> None:
    dit, label = load_reference_module(args.reference, bench.device, args.reference_attention)
    reference = build_reference(dit, model.config, model)
    ours = {p.data_ptr() for p in model.parameters()}
    shared = sum(p.data_ptr() in ours for p in reference.parameters())
    cache = reference_cache(reference, inputs)
    measure(
        bench, "reference", lambda: run_reference(reference, inputs, cache), args.reps, label,
        weights_shared=f"{shared} of {len(ours)} tensors", checkout=str(args.reference),
    )  # fmt: skip


def part_fast(bench: Bench, model: LongCatAvatarTransformer, inputs: dict, reps: int, compile_: bool) -> None:
    options = resolve_engine(engine_options("fast"), bench.device)
    if compile_ and options.compile:
        compile_blocks(model)
    measure(
        bench, "ours-fast", lambda: run_ours(model, inputs, options.runtime), reps, str(options.attention),
        runtime=str(options.runtime), compiled=compile_ and options.compile,
    )  # fmt: skip


def eager_copy(block: torch.nn.Module) -> torch.nn.Module:
    """A copy of `block` that runs eagerly: a compiled block's copy would still call the original's graph."""
    duplicate = copy.deepcopy(block)
    duplicate._compiled_call_impl = None
    return duplicate


def block0_fp8(bench: Bench, model: LongCatAvatarTransformer, inputs: dict, runtime: DiTRuntime) -> None:
    """Block 0 alone, eager, on the embedded inputs: bf16 with exact attention against both fp8 variants
    (adaLN linears kept, or converted) with the tier's runtime: the per-block error without 48 blocks of
    random-weight amplification."""
    with torch.no_grad():
        embedded = model.embed(
            inputs["latent"], inputs["timestep"], inputs["text"], inputs["text_mask"], inputs["audio"],
            cond=inputs["cond"], person_masks=inputs["person_masks"], cached="kv_cache" in inputs,
            skip_cross_attn=False,
        )  # fmt: skip
        cache = inputs["kv_cache"][0] if "kv_cache" in inputs else None
        block = eager_copy(model.blocks[0])
        ref = block(embedded.tokens, embedded, cache, runtime=runtime.exact())[0].float()
        for tag, keep in (("adaln-kept", FP32_LINEARS), ("adaln-fp8", ())):
            holder = torch.nn.Module()
            holder.blocks = torch.nn.ModuleList([copy.deepcopy(block)])
            converted = quantize_block_linears_fp8(holder, keep=keep)

            def run(holder: torch.nn.Module = holder) -> torch.Tensor:
                return holder.blocks[0](embedded.tokens, embedded, cache, runtime=runtime)[0].float()

            def case(tag: str = tag, converted: int = converted, run: Callable = run) -> None:
                d = run().double() - ref.double()
                bench.record(
                    f"fp8-block0/{tag}", linears=converted,
                    max_abs_vs_bf16_block=float(f"{d.abs().max().item():.3e}"),
                    rel_err_vs_bf16_block=float(f"{(d.norm() / ref.double().norm()).item():.3e}"),
                    attention=runtime.self_backend, device=bench.meta["device"], torch=torch.__version__,
                )  # fmt: skip

            bench.guarded(f"fp8-block0/{tag}", case)
            del holder


def part_fp8(
    bench: Bench, model: LongCatAvatarTransformer, inputs: dict, args: argparse.Namespace, compiled: bool
) -> None:
    """`compiled`: the blocks are compiled already (ours-fast ran) or stay eager (--no-compile)."""
    options = resolve_engine(engine_options("fast", fp8=True), bench.device)
    if bench.device.type != "cuda":
        raise RuntimeError("the fp8 tier needs a CUDA GPU with float8 matrix units (Hopper or newer)")
    bench.guarded("fp8-block0", lambda: block0_fp8(bench, model, inputs, options.runtime))
    keep = () if args.fp8_adaln else FP32_LINEARS
    t0 = time.perf_counter()
    converted = quantize_block_linears_fp8(model, keep=keep)
    sync()
    convert_s = time.perf_counter() - t0
    if not compiled:
        compile_blocks(model)
    measure(
        bench, "ours-fp8", lambda: run_ours(model, inputs, options.runtime), args.reps,
        f"{options.attention} (self-attention: {options.runtime.self_backend})",
        runtime=str(options.runtime), linears_fp8=converted, adaln_fp8=bool(args.fp8_adaln),
        convert_s=round(convert_s, 2), weights_gib=round(torch.cuda.memory_allocated() / 2**30, 2),
    )  # fmt: skip


# ----------------------------------------------------------------------------- main


def table(bench: Bench) -> str:
    ref = bench.results.get("reference", {}).get("median_s")
    cols = ("median_s", "first_call_s", "peak_gib", "max_abs_vs_ours_ref", "rel_err_vs_ours_ref")
    lines = [f"{'part':12s} " + " ".join(f"{c:>20s}" for c in cols) + f" {'vs reference':>13s}  attention"]
    for name, f in bench.results.items():
        if "median_s" not in f:
            lines.append(f"{name:12s} {json.dumps(f)}")
            continue
        speed = f"{ref / f['median_s']:.2f}x" if ref else "-"
        cells = " ".join(f"{str(f.get(c, '-')):>20s}" for c in cols)
        lines.append(f"{name:12s} {cells} {speed:>13s}  {f['attention']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="a LongCat-Video checkout (read only)")
    parser.add_argument("--version", choices=("1.5", "1.0"), default="1.5")
    parser.add_argument("--persons", type=int, choices=(1, 2), default=1)
    parser.add_argument("--task", choices=tuple(TASKS), default="ai2v", help="the benchmarked call")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of: {', '.join(PARTS)}")
    parser.add_argument(
        "--reference-attention", choices=("auto", "flash_attn", "flash3", "sdpa"), default="auto",
        help="the reference DiT's attention (auto: flash_attn if importable, else flash3 on Hopper, or sdpa)",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, default=3, help="timed calls per part after one warm-up call")
    parser.add_argument("--fp8-adaln", action="store_true", help="fp8 tier: convert the adaLN linears too")
    parser.add_argument("--no-compile", action="store_true", help="fast engine and fp8 tier eager")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; accepted: {', '.join(PARTS)}")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):  # fmt: skip
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 256)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        cfg, hw = tiny_config(args.version), (64, 64)
    else:
        cfg, hw = (LONGCAT_AVATAR_15 if args.version == "1.5" else LONGCAT_AVATAR_10), (480, 832)
    inputs = make_inputs(cfg, hw, args.persons, args.task, device)
    frame_tokens = (hw[0] // 16) * (hw[1] // 16)
    queries = inputs["latent"].shape[2] * frame_tokens
    keys = queries + (inputs["clean"].shape[2] * frame_tokens if "clean" in inputs else 0)
    meta: dict[str, Any] = {
        "argv": sys.argv,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "config": cfg.to_dict(),
        "input": {
            "task": {
                "ai2v": "ai2v first segment: 24 latents, latent 0 clean at timestep 0",
                "continuation": "continuation: 20 noisy latents over a cache of 5 clean ones (untimed cache "
                "pass), reference at RoPE time 10, masked band 3",
            }[args.task],
            "pixels": list(hw),
            "latent": list(inputs["latent"].shape),
            "tokens": queries,
            "self_attention_keys": keys,
            "timestep": TIMESTEP,
            "text": [1, cfg.model_max_length, cfg.caption_channels],
            "audio": list(inputs["audio"].shape),
            "persons": args.persons,
        },
    }
    bench = Bench(args.out, device, meta)
    t0 = time.perf_counter()
    model = build_ours(cfg, device)
    sync()
    params = sum(p.numel() for p in model.parameters())
    bench.record(
        "startup", parameters=params, build_and_init_s=round(time.perf_counter() - t0, 2),
        weights_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        tokens=queries, note="random bf16 weights on the device; no checkpoint read",
    )  # fmt: skip
    cache = our_cache(model, inputs)
    if cache is not None:
        inputs["kv_cache"] = cache
    compiled = False  # the blocks are compiled (ours-fast ran)
    for part in parts:
        runs: dict[str, Callable[[], None]] = {
            "ours-ref": partial(part_ours_ref, bench, model, inputs, args.reps),
            "reference": partial(part_reference, bench, model, inputs, args),
            "ours-fast": partial(part_fast, bench, model, inputs, args.reps, not args.no_compile),
            "ours-fp8": partial(part_fp8, bench, model, inputs, args, compiled or args.no_compile),
        }
        bench.guarded(part, runs[part])
        compiled = compiled or (part == "ours-fast" and not args.no_compile)
    ref, fast = bench.results.get("reference", {}), bench.results.get("ours-fast", {})
    if "median_s" in ref and "median_s" in fast:
        meta["speedup_fast_over_reference"] = round(ref["median_s"] / fast["median_s"], 3)
    if "median_s" in ref and "median_s" in bench.results.get("ours-fp8", {}):
        meta["speedup_fp8_over_reference"] = round(ref["median_s"] / bench.results["ours-fp8"]["median_s"], 3)
    meta["total_s"] = round(time.perf_counter() - T_START, 1)
    bench.record("done", total_s=meta["total_s"])
    print(json.dumps({k: meta[k] for k in ("device", "versions", "input")}))
    print(table(bench))
    for key in ("speedup_fast_over_reference", "speedup_fp8_over_reference"):
        if key in meta:
            print(f"{key}: {meta[key]}")
    print(f"total {meta['total_s']} s")


if __name__ == "__main__":
    main()
