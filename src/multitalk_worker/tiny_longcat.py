"""The built-in tiny LongCat-Video-Avatar models (`--weights tiny --model longcat-avatar[-1.0]`): every
network with seeded random weights, built in-process, the same classes and code paths as the full-size model.

* the DiT: a 2-layer, 2-head `LongCatAvatarTransformer` whose audio input fits the tiny audio encoder
  (1.5: Whisper's 5 pooled groups of width 8; 1.0: wav2vec2's 2 layers of width 16);
* the audio encoder: a 32-layer, width-8 Whisper encoder (32 layers: the reference pools hidden states
  0-31 in four groups, §4.4) with its 128-bin feature extractor, or the Wan tiny model's wav2vec2;
* umT5, its tokenizer and the Wan VAE: the Wan tiny model's (tiny.py), the same computation as the
  reference's (spec §2.9, §2.10);
* 1.5's DMD LoRA (`tiny_dmd_lora`, rank 4, on five linears), attached at run time like the published one,
  so the distilled jobs of the tiny model take the LoRA path too.

One generator seeded `seed` visits the DiT, umT5, the VAE and the audio encoder in that order, each in sorted
key order (tiny.randomize); the LoRA is drawn from its own generator seeded `seed + 1`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from multitalk_worker.models.audio_encoder import audio_features, build_audio_encoder
from multitalk_worker.models.configs import TINY
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.models.text_encoder import build_text_encoder
from multitalk_worker.models.vae import build_vae
from multitalk_worker.models.whisper_encoder import whisper_features
from multitalk_worker.pipeline.longcat import LongCatBundle
from multitalk_worker.pipeline.longcat_audio import AUDIO_V10, AUDIO_V15, FeatureEncoder
from multitalk_worker.registry import get_model
from multitalk_worker.tiny import build_tiny_feature_extractor, build_tiny_tokenizer, randomize
from multitalk_worker.weights.checkpoint import empty_model
from multitalk_worker.weights.longcat_lora import HYPHEN, PREFIX, attach_lora
from multitalk_worker.weights.original import T5_TIED

TINY_WHISPER: dict[str, Any] = {
    "num_mel_bins": 128, "d_model": 8, "encoder_layers": 32, "encoder_attention_heads": 2,
    "encoder_ffn_dim": 16, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 16,
    "max_source_positions": 1500, "max_target_positions": 16, "vocab_size": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_start_token_id": 1,
}  # fmt: skip

_TINY_DIT: dict[str, Any] = {
    "in_channels": 16, "out_channels": 16, "hidden_size": 64, "depth": 2, "num_heads": 2,
    "caption_channels": TINY.text_encoder.d_model, "model_max_length": TINY.text_encoder.text_len,
    "mlp_ratio": 4, "adaln_tembed_dim": 32, "frequency_embedding_size": 256, "patch_size": [1, 2, 2],
    "audio_window": 5, "intermediate_dim": 16, "output_dim": 16, "context_tokens": 4, "vae_scale": 4,
    "audio_prenorm": False, "class_range": 24, "class_interval": 4,
}  # fmt: skip
TINY_DIT: dict[str, dict[str, Any]] = {
    "longcat-avatar": _TINY_DIT | {"audio_block": 5, "audio_channel": 8, "text_tokens_zero_pad": True},
    "longcat-avatar-1.0": _TINY_DIT
    | {"audio_block": TINY.audio_encoder.num_hidden_layers, "audio_channel": TINY.audio_encoder.hidden_size,
       "text_tokens_zero_pad": False},
}  # fmt: skip


def _whisper(generator: torch.Generator, device: torch.device) -> tuple[FeatureEncoder, nn.Module]:
    with empty_model():
        encoder = WhisperEncoder(WhisperConfig(**TINY_WHISPER))
    randomize(encoder, generator, device=device, dtype=torch.float32)
    encoder.eval()
    extractor = WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"])

    def encode(signal: np.ndarray, frames: int) -> Tensor:
        return whisper_features(encoder, extractor, signal, frames).cpu()

    return encode, encoder


def _wav2vec(generator: torch.Generator) -> tuple[FeatureEncoder, nn.Module]:
    with empty_model():
        model = build_audio_encoder(TINY.audio_encoder)
    randomize(model, generator, device=torch.device("cpu"), dtype=torch.float32)
    extractor = build_tiny_feature_extractor()

    def encode(signal: np.ndarray, frames: int) -> Tensor:
        return audio_features(model, extractor, signal, frames=frames)

    return encode, model


# module path -> parts its lora_up is split in (0: one `lora_up.weight`): a split qkv and kv, plain
# linears in the bf16 path and one in a float32 island (the adaLN modulation)
TINY_LORA_TARGETS = {
    "blocks.0.attn.qkv": 3,
    "blocks.1.cross_attn.kv_linear": 2,
    "blocks.0.ffn.w2": 0,
    "blocks.1.audio_cross_attn.q_linear": 0,
    "blocks.0.adaLN_modulation.1": 0,
}
TINY_LORA_RANK = 4
TINY_LORA_ALPHA_SCALE = 0.5


def tiny_dmd_lora(dit: nn.Module, seed: int) -> dict[str, Tensor]:
    """A DMD-style LoRA for the tiny DiT in the published key grammar and dtype (float32, spec §2.7),
    its values drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for target, parts in TINY_LORA_TARGETS.items():
        layer = dit.get_submodule(target)
        assert isinstance(layer, nn.Linear)
        name = PREFIX + target.replace(".", HYPHEN)
        n, rank = max(parts, 1), TINY_LORA_RANK
        tensors[f"{name}.lora_down.weight"] = torch.randn(n * rank, layer.in_features, generator=generator)
        ups = [f"{name}.lora_up.blocks.{i}.weight" for i in range(parts)] or [f"{name}.lora_up.weight"]
        for key in ups:
            tensors[key] = 0.5 * torch.randn(layer.out_features // n, rank, generator=generator) / rank**0.5
        tensors[f"{name}.lora_down.weight"] /= layer.in_features**0.5
        tensors[f"{name}.alpha_scale"] = torch.tensor(TINY_LORA_ALPHA_SCALE)
    return tensors


def build_tiny_longcat_bundle(
    model: str = "longcat-avatar",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LongCatBundle:
    """The tiny model of registry entry `model` with weights drawn from `seed`."""
    spec = get_model(model)
    if spec.family is None or model not in TINY_DIT:
        raise ValueError(f"model {model} is not a LongCat-Video-Avatar model")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with empty_model():
        dit = LongCatAvatarTransformer(LongCatAvatarConfig.from_dict(TINY_DIT[model], name="tiny"))
        text_encoder = build_text_encoder(TINY.text_encoder)
        vae = build_vae(TINY.vae)
    randomize(dit, generator, device=device, dtype=dtype)
    randomize(text_encoder, generator, device=device, dtype=dtype, tied=dict(T5_TIED))
    randomize(vae, generator, device=device, dtype=torch.float32)
    v15 = spec.family.audio_folder.startswith("whisper")
    audio, audio_encoder = _whisper(generator, device) if v15 else _wav2vec(generator)
    # 1.5's DMD LoRA from its own generator (the other weights do not depend on it), switched per job
    lora = attach_lora(dit, tiny_dmd_lora(dit, seed + 1)) if v15 else None
    return LongCatBundle(
        dit=dit.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tiny_tokenizer(max_length=TINY.text_encoder.text_len),
        vae=vae,
        audio=audio,
        audio_config=AUDIO_V15 if v15 else AUDIO_V10,
        model=model,
        weights="tiny",
        lora=lora,
        audio_encoder=audio_encoder,
    )
