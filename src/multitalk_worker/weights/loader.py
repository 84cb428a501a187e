"""Load every network of one model folder (original or Diffusers layout) into a ModelBundle.

Every model is built on the meta device and its tensors are read one at a time, converted to the target
device and dtype, and assigned, so a model never exists twice in memory. Precision per component follows
the reference (spec 1.3, 5.10): DiT and umT5 in `dtype` (bf16), CLIP in fp16, VAE in fp32, wav2vec2 in fp32
on the CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionModel,
    PreTrainedTokenizerBase,
    UMT5EncoderModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from multitalk_worker.errors import ModelLoadFailed, ModelMissing
from multitalk_worker.models.configs import CONFIGS, MultiTalkConfig
from multitalk_worker.models.image_encoder import build_image_encoder
from multitalk_worker.models.text_encoder import build_text_encoder
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.models.vae import build_vae
from multitalk_worker.registry import DEFAULT_MODEL, get_model
from multitalk_worker.weights import diffusers_layout, original
from multitalk_worker.weights.adapters import resolve_adapter
from multitalk_worker.weights.checkpoint import Component, empty_model, load_component
from multitalk_worker.weights.wav2vec import WAV2VEC_DIR, load_wav2vec

logger = logging.getLogger(__name__)

Layout = Literal["original", "diffusers"]
DEFAULT_ADAPTER = get_model(DEFAULT_MODEL).adapter().name  # "multitalk"
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 1


@dataclass(frozen=True)
class ModelBundle:
    """Every network and preprocessor of one model, ready for inference."""

    dit: MultiTalkTransformer
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    image_encoder: CLIPVisionModel
    vae: AutoencoderKLWan
    audio_encoder: Wav2Vec2Model
    feature_extractor: Wav2Vec2FeatureExtractor
    config: MultiTalkConfig
    model: str = DEFAULT_MODEL  # registry.MODELS name
    adapter: str = DEFAULT_ADAPTER  # registry.Adapter name whose file the DiT's audio layers came from


@dataclass(frozen=True)
class ComponentDtypes:
    dit: torch.dtype
    text_encoder: torch.dtype
    image_encoder: torch.dtype
    vae: torch.dtype
    audio_encoder: torch.dtype


def component_dtypes(dtype: torch.dtype) -> ComponentDtypes:
    """Reference precision per network for a run in `dtype`: 16-bit runs use fp16 CLIP; a float32 run
    (tests, CPU parity) keeps everything in float32. The VAE and wav2vec2 are always float32."""
    half = dtype in (torch.bfloat16, torch.float16)
    return ComponentDtypes(
        dit=dtype,
        text_encoder=dtype,
        image_encoder=torch.float16 if half else dtype,
        vae=torch.float32,
        audio_encoder=torch.float32,
    )


def detect_layout(root: Path) -> Layout:
    """ "original" for a Wan2.1 folder (index json or DiT shards at the top), "diffusers" for a Diffusers
    folder."""
    if (root / original.DIT_INDEX).is_file() or any(
        root.glob(f"{original.DIT_SHARD_STEM}-*-of-*.safetensors")
    ):
        return "original"
    if (root / diffusers_layout.MODEL_INDEX).is_file() or (
        root / diffusers_layout.TRANSFORMER_INDEX
    ).is_file():
        return "diffusers"
    raise ModelMissing(
        f"{root} is not a model folder: expected {original.DIT_INDEX} or the "
        f"{original.DIT_SHARD_STEM}-0000i-of-0000N.safetensors shards (Wan2.1-I2V-14B-480P layout) or "
        f"{diffusers_layout.MODEL_INDEX} (Wan2.1-I2V-14B-480P-Diffusers layout)"
    )


def _dit_config_json(root: Path, layout: Layout) -> dict[str, object]:
    name = original.CONFIG_FILE if layout == "original" else "transformer/config.json"
    path = root / name
    if not path.is_file():
        raise ModelMissing(f"missing checkpoint file {name} (looked for {path})")
    return json.loads(path.read_text())


def detect_config(root: Path, layout: Layout) -> MultiTalkConfig:
    """The preset whose DiT matches the folder's config.json (width, layers, heads, FFN width)."""
    raw = _dit_config_json(root, layout)
    if layout == "original":
        found = (raw.get("dim"), raw.get("num_layers"), raw.get("num_heads"), raw.get("ffn_dim"))
    else:
        heads, head_dim = raw.get("num_attention_heads"), raw.get("attention_head_dim")
        dim = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
        found = (dim, raw.get("num_layers"), heads, raw.get("ffn_dim"))
    for preset in CONFIGS.values():
        dit = preset.dit
        if found == (dit.dim, dit.num_layers, dit.num_heads, dit.ffn_dim):
            return preset
    accepted = ", ".join(
        f"{n} {(c.dit.dim, c.dit.num_layers, c.dit.num_heads, c.dit.ffn_dim)}" for n, c in CONFIGS.items()
    )
    raise ModelLoadFailed(
        f"the DiT in {root} (dim, layers, heads, ffn_dim = {found}) matches no preset; accepted: {accepted}"
    )


def base_source(layout: Layout) -> Callable[[Path], Component]:
    """The function that opens and plans the DiT's Wan base (no audio layers) in this layout."""
    return original.base_component if layout == "original" else diffusers_layout.base_component


def encoder_sources(layout: Layout) -> dict[str, Callable[[Path], Component]]:
    """Per network other than the DiT, the function that opens and plans its tensors in this layout."""
    if layout == "original":
        return {
            "text_encoder": original.t5_component,
            "image_encoder": original.clip_component,
            "vae": original.vae_component,
        }
    return {
        "text_encoder": diffusers_layout.text_encoder_component,
        "image_encoder": diffusers_layout.image_encoder_component,
        "vae": diffusers_layout.vae_component,
    }


def component_sources(
    root: Path, layout: Layout, adapter_file: str = original.MULTITALK_FILE
) -> dict[str, Callable[[Path], Component]]:
    """Per network, the function that opens and plans its tensors in this layout; the DiT's audio layers
    come from `adapter_file` (relative to root)."""
    dit = original.dit_component if layout == "original" else diffusers_layout.dit_component
    return {"dit": lambda folder: dit(folder, adapter_file), **encoder_sources(layout)}


@dataclass(frozen=True)
class Networks:
    """The checkpoint-loaded networks of one model, each by its type; `by_name` for loops over them
    (the names of `component_sources`)."""

    dit: MultiTalkTransformer
    text_encoder: UMT5EncoderModel
    image_encoder: CLIPVisionModel
    vae: AutoencoderKLWan

    def by_name(self) -> dict[str, nn.Module]:
        return {
            "dit": self.dit,
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "vae": self.vae,
        }


def empty_models(config: MultiTalkConfig) -> Networks:
    """Every checkpoint-loaded network of `config`, built on the meta device."""
    with empty_model():
        return Networks(
            dit=MultiTalkTransformer(config.dit),
            text_encoder=build_text_encoder(config.text_encoder),
            image_encoder=build_image_encoder(config.image_encoder),
            vae=build_vae(config.vae),
        )


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer; pad id 0 and EOS id 1 are required (spec 4)."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise ModelMissing(f"missing tokenizer in {folder}: expected tokenizer.json or spiece.model")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id != PAD_TOKEN_ID or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise ModelLoadFailed(
            f"tokenizer in {folder} has pad id {tokenizer.pad_token_id} and EOS id {tokenizer.eos_token_id}; "
            f"umT5 requires pad {PAD_TOKEN_ID} and EOS {EOS_TOKEN_ID}"
        )
    return tokenizer


def load_models(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: MultiTalkConfig | None = None,
    wav2vec_path: str | Path | None = None,
    audio_device: str | torch.device = "cpu",
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
    persons: int = 1,
) -> ModelBundle:
    """Load every network of registry model `model` from `path` (layout detected) and the wav2vec2 folder.

    The DiT is the folder's Wan base plus the audio layers of the adapter `adapter` (a registry name:
    "multitalk", "single", "multi"), by default the model's adapter for `persons` speakers. `config`
    defaults to the preset matching the folder's DiT config.json; `wav2vec_path` defaults to
    `<path>/chinese-wav2vec2-base`. The audio encoder runs on `audio_device` (the reference uses the CPU).
    """
    root = Path(path)
    chosen = resolve_adapter(model, adapter, persons=persons)
    layout = detect_layout(root)
    config = config or detect_config(root, layout)
    device = torch.device(device)
    dtypes = component_dtypes(dtype)
    logger.info(
        "loading %s (%s layout, preset %s, model %s, adapter %s) to %s",
        root, layout, config.name, model, chosen.file, device,
    )  # fmt: skip
    models = empty_models(config)
    for name, open_component in component_sources(root, layout, chosen.file).items():
        component = open_component(root)
        for note in component.plan.notes:
            logger.info("%s: %s", root, note)
        try:
            load_component(component, models.by_name()[name], device=device, dtype=getattr(dtypes, name))
        finally:
            component.close()
        logger.info("loaded %s", name)
    tokenizer_dir = original.TOKENIZER_DIR if layout == "original" else diffusers_layout.TOKENIZER_DIR
    tokenizer = load_tokenizer(root / tokenizer_dir)
    wav2vec_dir = Path(wav2vec_path) if wav2vec_path is not None else root / WAV2VEC_DIR
    audio_encoder, feature_extractor = load_wav2vec(wav2vec_dir, device=torch.device(audio_device))
    return ModelBundle(
        dit=models.dit,
        text_encoder=models.text_encoder,
        tokenizer=tokenizer,
        image_encoder=models.image_encoder,
        vae=models.vae,
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
        config=config,
        model=model,
        adapter=chosen.name,
    )
