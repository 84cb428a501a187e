"""Frozen configs for every network, and the one registry of presets (TINY and the 14B model).

Numbers come from the spec (../shared/spec/multitalk-inference.md sections 1.3, 2.4, 3.3, 4, 5.1, 8).
The 480p and 720p presets share every network; they differ in the pipeline settings (bucket table,
default shift, TeaCache coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

WAN_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1-I2V DiT plus the MultiTalk audio layers (spec 5.1)."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280
    eps: float = 1e-6
    rope_max_positions: int = 1024
    # audio projector (spec 5.6)
    audio_window: int = 5
    audio_vf_window: int = 8  # audio_window + vae temporal stride (4) - 1
    audio_layers: int = 12  # wav2vec2 hidden states used
    audio_channels: int = 768  # wav2vec2 width
    audio_hidden: int = 512
    audio_tokens: int = 32  # tokens per latent frame per person
    audio_dim: int = 768  # audio token width
    # Label-RoPE (spec 5.8)
    lrope_class_range: int = 24
    lrope_class_interval: int = 4
    # reference attention map: heads are processed in this many groups (spec 5.7)
    ref_map_head_groups: int = 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5-XXL encoder as transformers' UMT5EncoderModel (spec 4, 8.5)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    text_len: int = 512


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Open-clip XLM-R ViT-H/14 visual tower as transformers' CLIPVisionModel (spec 3.3, 8.5)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE as diffusers' AutoencoderKLWan (spec 3.4, 8.5)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN_LATENT_STD


@dataclass(frozen=True)
class AudioEncoderConfig:
    """chinese-wav2vec2-base as transformers' Wav2Vec2Model (spec 2.4). The real run reads the folder's
    own config.json; these values build the tiny model and document the base architecture."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16


@dataclass(frozen=True)
class MultiTalkConfig:
    """Every network of one model preset."""

    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    resolution: Literal["480p", "720p"] = "480p"


TINY = MultiTalkConfig(
    name="tiny",
    dit=DiTConfig(
        dim=32,
        ffn_dim=64,
        freq_dim=16,
        num_heads=2,
        num_layers=2,
        text_dim=32,
        text_len=16,
        image_dim=32,
        audio_layers=2,
        audio_channels=16,
        audio_hidden=32,
        audio_tokens=4,
        audio_dim=16,
    ),
    text_encoder=TextEncoderConfig(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, text_len=16
    ),
    image_encoder=ImageEncoderConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=224,
        patch_size=56,
        projection_dim=16,
    ),
    vae=VAEConfig(base_dim=8),
    audio_encoder=AudioEncoderConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
    ),
)

WAN_14B_480P = MultiTalkConfig(name="14b-480p", resolution="480p")
WAN_14B_720P = MultiTalkConfig(name="14b-720p", resolution="720p")

CONFIGS: dict[str, MultiTalkConfig] = {c.name: c for c in (TINY, WAN_14B_480P, WAN_14B_720P)}


def get_config(name: str) -> MultiTalkConfig:
    """The preset called `name`; a KeyError lists the accepted names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; accepted: {', '.join(CONFIGS)}") from None
