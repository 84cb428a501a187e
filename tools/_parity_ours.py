"""Our side of the parity check: the same stages through multitalk_worker's loaders and models.

Shared by tools/parity.py (against the live reference) and tests/test_parity_fixtures.py (against stored
reference outputs), so both run exactly the same code.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.audio_proj import split_audio_windows, vae_temporal_stride
from multitalk_worker.models.configs import TINY, DiTConfig, ImageEncoderConfig, MultiTalkConfig, VAEConfig
from multitalk_worker.models.image_encoder import build_image_encoder, encode_image
from multitalk_worker.models.text_encoder import build_text_encoder, encode_text
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.models.vae import build_vae, vae_decode, vae_encode
from multitalk_worker.weights import original
from multitalk_worker.weights.checkpoint import Component, load_component
from multitalk_worker.weights.wav2vec import load_wav2vec

Tensors = dict[str, Tensor]

# The tiny preset, except the CLIP patch (14, as ViT-H/14: the DiT's cross-attention takes exactly 257
# image tokens in the reference, so the CLIP stage uses the real token count too) and a VAE of base width 4
# (same structure; keeps the stored fixture weights under 1 MB).
PARITY: MultiTalkConfig = replace(
    TINY,
    name="parity",
    vae=VAEConfig(base_dim=4),
    image_encoder=ImageEncoderConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,
        projection_dim=16,
    ),
)

# The reference WanModel constructor hard-codes the CLIP width (1280) and the wav2vec size (12 x 768) of its
# projectors; PARITY swaps in the reference's own projector classes at tiny sizes. This DiT keeps the real
# sizes, so one stage runs the reference constructor exactly as written (tool only: its weights are 22 MB).
NATIVE_DIT: DiTConfig = replace(PARITY.dit, image_dim=1280, audio_layers=12, audio_channels=768)

CPU = torch.device("cpu")


def cast_dit_inputs(inputs: Tensors, dtype: torch.dtype) -> Tensors:
    """The pipeline's dtypes: latent, timestep and masks float32; context, CLIP, y and audio in `dtype`."""
    low = ("context", "clip_fea", "y", "audio")
    return {k: (v.to(dtype) if k in low else v) for k, v in inputs.items()}


def _load(component: Component, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """The per-component step of weights.loader.load_models: check every tensor, convert, assign."""
    try:
        load_component(component, model, device=CPU, dtype=dtype)
    finally:
        component.close()


def load_dit(
    folder: Path, cfg: DiTConfig, dtype: torch.dtype, adapter: str | None = None
) -> MultiTalkTransformer:
    """Our DiT with the folder's weights (original layout) in `dtype`, read as load_models reads them;
    the audio layers from the adapter file `adapter` (relative to folder; None: multitalk.safetensors)."""
    model = MultiTalkTransformer(cfg).eval().requires_grad_(False)
    _load(original.dit_component(folder, *(() if adapter is None else (adapter,))), model, dtype)
    return model


@torch.no_grad()
def run_dit(folder: Path, cfg: DiTConfig, inputs: Tensors, dtype: torch.dtype) -> Tensor:
    return dit_forward(load_dit(folder, cfg, dtype), inputs, dtype)


@torch.no_grad()
def dit_forward(model: MultiTalkTransformer, inputs: Tensors, dtype: torch.dtype) -> Tensor:
    """One forward of a loaded DiT on `inputs` cast to the pipeline's dtypes (float32 result)."""
    x = cast_dit_inputs(inputs, dtype)
    out = model(
        x["latent"], x["timestep"], x["context"], x["clip_fea"], x["y"], x["audio"], x["person_masks"]
    )
    return out.float()


@torch.no_grad()
def run_audio_proj(folder: Path, cfg: DiTConfig, audio: Tensor) -> Tensor:
    """audio [1, P, F, W, layers, C] -> tokens [P, T, n, d] (projector of the loaded DiT, float32)."""
    return audio_proj_forward(load_dit(folder, cfg, torch.float32), audio).float()


@torch.no_grad()
def audio_proj_forward(model: MultiTalkTransformer, audio: Tensor) -> Tensor:
    """The loaded DiT's audio projector on windows [1, P, F, W, layers, C], in the model's dtype."""
    first, rest = split_audio_windows(audio[0], vae_temporal_stride(model.config))
    return model.audio_proj(first, rest)


@torch.no_grad()
def run_t5(folder: Path, inputs: Tensors, dtype: torch.dtype) -> Tensors:
    encoder = build_text_encoder(PARITY.text_encoder)
    _load(original.t5_component(folder), encoder, dtype)
    out = encode_text(encoder, inputs["input_ids"], inputs["attention_mask"])
    return {f"context_{i}": o.float() for i, o in enumerate(out)}


@torch.no_grad()
def run_clip(folder: Path, inputs: Tensors) -> Tensors:
    encoder = build_image_encoder(PARITY.image_encoder)
    _load(original.clip_component(folder), encoder)
    return {"clip_fea": encode_image(encoder, inputs["image"]).float()}


def _vae(folder: Path) -> nn.Module:
    vae = build_vae(PARITY.vae)
    _load(original.vae_component(folder), vae)
    return vae


@torch.no_grad()
def run_vae_encode(folder: Path, video: Tensor) -> Tensor:
    return vae_encode(_vae(folder), video)


@torch.no_grad()
def run_vae_decode(folder: Path, latent: Tensor) -> Tensor:
    """Decodes the reference's latent, so that the decode error is the decoder's own."""
    return vae_decode(_vae(folder), latent)


@torch.no_grad()
def run_wav2vec(folder: Path, inputs: Tensors) -> Tensors:
    model, extractor = load_wav2vec(folder, device=CPU)
    return {"features": audio_features(model, extractor, inputs["signal"].numpy()).float()}


# --------------------------------------------------------------------------- stages

F32_TOLERANCE = 1e-4
# Both models in bfloat16: see tools/parity.py for the justification of these bounds. Two persons need
# more: the Label-RoPE class of a token is an argmax over bf16 reference-map values, which a valid change
# of rounding order can flip for near-tied tokens.
BF16_TOLERANCE = 2e-2
BF16_TWO_PERSON_TOLERANCE = 5e-2

STAGE_TOLERANCES: dict[str, float] = {
    "dit_1p_f32": F32_TOLERANCE,
    "dit_2p_f32": F32_TOLERANCE,
    "dit_native_1p_f32": F32_TOLERANCE,
    "dit_native_2p_f32": F32_TOLERANCE,
    "audio_proj": F32_TOLERANCE,
    "t5": F32_TOLERANCE,
    "clip": F32_TOLERANCE,
    "vae_encode": F32_TOLERANCE,
    "vae_decode": F32_TOLERANCE,
    "wav2vec2": F32_TOLERANCE,
    "dit_1p_bf16": BF16_TOLERANCE,
    "dit_2p_bf16": BF16_TWO_PERSON_TOLERANCE,
    "t5_bf16": BF16_TOLERANCE,
}
DIT_DIR, T5_DIR, CLIP_DIR, VAE_DIR, WAV2VEC_DIR = "dit", "t5", "clip", "vae", "wav2vec/chinese-wav2vec2-base"
NATIVE_DIR = "dit_native"  # not stored as a fixture


def run_stage(stage: str, root: Path, inputs: Tensors) -> Tensors:
    """Our outputs of one stage, from the weights under `root` (original layouts) and the stage inputs."""
    if stage.startswith("dit_native"):
        return {"out": run_dit(root / NATIVE_DIR, NATIVE_DIT, inputs, torch.float32)}
    if stage.startswith("dit_"):
        dtype = torch.bfloat16 if stage.endswith("bf16") else torch.float32
        return {"out": run_dit(root / DIT_DIR, PARITY.dit, inputs, dtype)}
    runners = {
        "audio_proj": lambda: {"tokens": run_audio_proj(root / DIT_DIR, PARITY.dit, inputs["audio"])},
        "t5": lambda: run_t5(root / T5_DIR, inputs, torch.float32),
        "t5_bf16": lambda: run_t5(root / T5_DIR, inputs, torch.bfloat16),
        "clip": lambda: run_clip(root / CLIP_DIR, inputs),
        "vae_encode": lambda: {"latent": run_vae_encode(root / VAE_DIR, inputs["video"])},
        "vae_decode": lambda: {"decoded": run_vae_decode(root / VAE_DIR, inputs["latent"])},
        "wav2vec2": lambda: run_wav2vec(root / WAV2VEC_DIR, inputs),
    }
    return runners[stage]()


def compare(ours: Tensors, reference: Tensors) -> tuple[float, float]:
    """(max |a − b|, ||a − b||₂ / ||b||₂) over all tensors of a stage, in float64."""
    if ours.keys() != reference.keys():
        raise KeyError(f"outputs {sorted(ours)} do not match reference outputs {sorted(reference)}")
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    for key, ref in reference.items():
        a, b = ours[key].double(), ref.double()
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
        d = a - b
        max_abs = max(max_abs, float(d.abs().max()))
        diff_sq += float(d.pow(2).sum())
        ref_sq += float(b.pow(2).sum())
    return max_abs, (diff_sq / ref_sq) ** 0.5
