"""LongCat-Video-Avatar DiT parity, our side: the cases, their inputs, our runs and the comparison.

Shared by tools/parity.py (`--model longcat-avatar` / `longcat-avatar-1.0`, against a LongCat-Video checkout
through tools/_parity_longcat_cases.py) and tests/test_parity_longcat.py (against the stored fixtures).

Each case is one DiT forward on the tiny model (tests/tiny_longcat.py) in float32 on the CPU:

* at2v_1p: no clean latent, CFG-sized batch 2 with per-item text lengths and timesteps 1000 / 876.
* ai2v_1p: the image latent clean at timestep 0; ai2v_2p / ai2v_3p: two speakers routed by person masks
  (3 masks, 2 streams; 4 masks, 3 streams with the silent one).
* cont_1p / cont_2p: a continuation: the cache pass on the reference + 4 conditioning latents, then one
  denoising call on the noisy latents with the cached keys, reference at RoPE time 6, masked band ±1.
* cont_nocache_1p: the same continuation as one call over all latents (clean ones at timestep 0).
* cont_band_front_1p, cont_far_ref_1p, cont_negative_ref_1p: the band at the window's front edge, and no band
  (reference at time 30; at −10 with range 3, in one call).
* lora_* (1.5 only): the same cases with a DMD-style LoRA (reference key grammar, split ups on attn.qkv and
  cross_attn.kv_linear, alpha_scale 0.375), added at run time on both sides; bf16_lora_*: the same in
  bfloat16 (the LoRA tensors in the DiT's dtype, as the reference's `enable_loras` casts them).
* bf16_*: cases in bfloat16 (the published weights as they are, the reference's CUDA autocast float32
  islands emulated on the CPU); tolerance 2e-2, 5e-2 with two speakers (tools/parity.py says why).
* int8_* (1.5 only): the same cases on `base_model_int8/` as the reference's own `quantize_model` and
  `save_quantized_state_dict` write it from the tiny model, loaded by its `load_quantized_dit` and by ours.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from multitalk_worker.models.longcat.transformer import Conditioning, LongCatAvatarTransformer  # noqa: E402
from multitalk_worker.weights.longcat import INT8_FOLDER, load_dit  # noqa: E402
from multitalk_worker.weights.longcat_lora import attach_lora  # noqa: E402
from tests.tiny_longcat import LORA_FILE, TINY_10, TINY_15  # noqa: E402

Tensors = dict[str, torch.Tensor]
# model name -> (tiny config dict, the DiT folder as published)
VERSIONS = {"longcat-avatar": (TINY_15, "base_model"), "longcat-avatar-1.0": (TINY_10, "avatar_single")}
TOLERANCE = 1e-5  # rel_err in float32: rounding only
LATENT_HW = (8, 8)  # 4 x 4 tokens per latent frame
CACHE_LATENTS = 5  # reference + 4 conditioning latents


@dataclass(frozen=True)
class Case:
    batch: int
    frames: int  # latents in the call (all of them for a no-cache continuation)
    segment: int  # latents of the segment the audio covers
    streams: int
    masks: int  # person-mask classes (0: none)
    cond: Conditioning
    cached: bool = False
    timesteps: tuple[float, ...] = (937.3,)  # not a bf16 value: the DiT rounds it in a bf16 run
    int8: bool = False
    lora: bool = False
    bf16: bool = False


CONT = Conditioning(num_cond_latents=CACHE_LATENTS, num_ref_latents=1, ref_img_index=6, mask_frame_range=1)
CASES: dict[str, Case] = {
    "at2v_1p": Case(2, 3, 3, 2, 0, Conditioning(), timesteps=(1000.0, 876.2)),
    "ai2v_1p": Case(1, 3, 3, 1, 0, Conditioning(num_cond_latents=1), timesteps=(498.7,)),
    "ai2v_2p": Case(1, 3, 3, 2, 3, Conditioning(num_cond_latents=1)),
    "ai2v_3p": Case(1, 3, 3, 3, 4, Conditioning(num_cond_latents=1)),
    "cont_1p": Case(1, 4, 8, 1, 0, CONT, cached=True),
    "cont_2p": Case(1, 4, 8, 2, 3, CONT, cached=True),
    "cont_nocache_1p": Case(1, 9, 8, 1, 0, CONT),
    # the masked band at the window's front (noisy latents 0-2), off (reference beyond / before the window)
    "cont_band_front_1p": Case(1, 4, 8, 1, 0, replace(CONT, ref_img_index=5), cached=True),
    "cont_far_ref_1p": Case(1, 4, 8, 1, 0, replace(CONT, ref_img_index=30), cached=True),
    "cont_negative_ref_1p": Case(1, 9, 8, 1, 0, replace(CONT, ref_img_index=-10, mask_frame_range=3)),
}
CASES |= {f"int8_{name}": replace(CASES[name], int8=True) for name in ("ai2v_1p", "ai2v_2p", "cont_2p")}
CASES |= {f"lora_{name}": replace(CASES[name], lora=True) for name in ("ai2v_2p", "cont_1p")}
CASES |= {
    f"bf16_{name}": replace(CASES[name], bf16=True) for name in ("at2v_1p", "ai2v_1p", "ai2v_2p", "cont_2p")
}
# the LoRA in a bf16 run: its two bf16 roundings per layer and its float32 islands, as the reference's
CASES |= {f"bf16_lora_{name}": replace(CASES[name], lora=True, bf16=True) for name in ("ai2v_2p", "cont_1p")}
VARIANT_PREFIXES = ("int8_", "lora_", "bf16_lora_", "bf16_")  # a variant case runs on its base case's inputs
BF16_TOLERANCE = {1: 2e-2, 2: 5e-2}  # by speakers routed (1: none)


def tolerance(case: Case) -> float:
    return BF16_TOLERANCE[2 if case.masks else 1] if case.bf16 else TOLERANCE


INT8_MODELS = ("longcat-avatar",)  # only v1.5 publishes an INT8 DiT and the DMD LoRA


def cases_for(model_name: str) -> dict[str, Case]:
    return {n: c for n, c in CASES.items() if not (c.int8 or c.lora) or model_name in INT8_MODELS}


def variant(case: Case) -> str:
    """Which model a case runs on: "int8", "lora", "bf16_lora", "bf16" (a bf16 run) or "float" (float32)."""
    if case.lora:
        return "bf16_lora" if case.bf16 else "lora"
    return "int8" if case.int8 else "bf16" if case.bf16 else "float"


def case_inputs(cfg: dict, case: Case, seed: int) -> Tensors:
    """Seeded inputs of one case (float32; text mask as int64 0/1; the clean latents as `clean`)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = LATENT_HW
    text_len = cfg["model_max_length"]
    audio_frames = cfg["vae_scale"] * (case.segment - 1) + 1
    inputs: Tensors = {
        "latent": torch.randn(case.batch, cfg["in_channels"], case.frames, h, w, generator=gen),
        "text": torch.randn(case.batch, text_len, cfg["caption_channels"], generator=gen),
        "audio": torch.randn(
            case.streams,
            audio_frames,
            cfg["audio_window"],
            cfg["audio_block"],
            cfg["audio_channel"],
            generator=gen,
        ),
    }
    mask = torch.zeros(case.batch, text_len, dtype=torch.int64)
    for i in range(case.batch):
        mask[i, : text_len - 3 * i - 2] = 1
    inputs["text_mask"] = mask
    t = torch.tensor(case.timesteps).repeat(case.batch)[: case.batch]
    clean = case.cond.num_cond_latents if not case.cached else 0
    inputs["timestep"] = t[:, None].repeat(1, case.frames)
    inputs["timestep"][:, :clean] = 0.0
    if case.cached:
        inputs["clean"] = torch.randn(case.batch, cfg["in_channels"], CACHE_LATENTS, h, w, generator=gen)
    if case.masks:
        inputs["person_masks"] = _person_masks(case.masks, 8 * h, 8 * w)
    return inputs


def _person_masks(classes: int, height: int, width: int) -> torch.Tensor:
    """Person 1 on the left, person 2 on the right, background the rest, then `others` bands (pixels)."""
    masks = torch.zeros(classes, height, width)
    masks[0, 8:, : width // 2 - 4] = 1
    masks[1, 8:, width // 2 + 4 :] = 1
    masks[2] = (masks[0] + masks[1] == 0).float()
    for k in range(3, classes):
        masks[k, : 8 * (k - 2)] = 1
    return masks


def run_ours(model: LongCatAvatarTransformer, case: Case, inputs: Tensors) -> Tensors:
    """Our DiT on one case: {"out": [B, 16, T, h, w] float32}."""
    with torch.no_grad():
        cache = None
        if case.cached:
            cache = model.clean_cache(
                inputs["clean"], torch.zeros_like(inputs["text"]), inputs["audio"], cond=case.cond
            )
        out = model(
            inputs["latent"],
            inputs["timestep"],
            inputs["text"],
            inputs["text_mask"],
            inputs["audio"],
            cond=case.cond,
            person_masks=inputs.get("person_masks"),
            kv_cache=cache,
        )
    return {"out": out}


def load_ours(root: Path, model_name: str, which: str = "float") -> LongCatAvatarTransformer:
    """The tiny DiT folder under root through our strict loader (`which`: see `variant`)."""
    folder = INT8_FOLDER if which == "int8" else VERSIONS[model_name][1]
    dtype = torch.bfloat16 if which in ("bf16", "bf16_lora") else torch.float32
    model = load_dit(root, folder, device=torch.device("cpu"), dtype=dtype)
    if which in ("lora", "bf16_lora"):
        attach_lora(model, root / LORA_FILE).enabled = True
    return model


def compare(ours: Tensors, ref: Tensors) -> tuple[float, float]:
    """(max |ours − ref|, ||ours − ref|| / ||ref||) over every output, float64 sums."""
    max_abs, num, den = 0.0, 0.0, 0.0
    for name, r in ref.items():
        d = ours[name].double() - r.double()
        max_abs = max(max_abs, d.abs().max().item())
        num += d.pow(2).sum().item()
        den += r.double().pow(2).sum().item()
    return max_abs, (num / den) ** 0.5 if den else num**0.5
