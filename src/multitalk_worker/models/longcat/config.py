"""The LongCat-Video-Avatar DiT configuration, read from the published `config.json` (spec §2.3, §3.1).

The published file is a diffusers config: the architecture keys below, plus attention and parallelism
switches that choose kernels, not numbers (`enable_flashattn2`, `cp_split_hw`, ...), and bookkeeping keys
(`_class_name`, `architectures`, `model_max_length`, ...). The kernel switches are accepted and ignored (our
runtime picks the attention backend); any other unknown key is refused, so a file of another model is
named as such instead of half-loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from multitalk_worker.errors import CheckpointError

CLASS_NAME = "LongCatVideoAvatarTransformer3DModel"
# Keys of the published config.json that do not change the network or its numbers.
IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "architectures",
        "enable_flashattn3",
        "enable_flashattn2",
        "enable_xformers",
        "enable_bsa",
        "bsa_params",
        "cp_split_hw",
    }
)


@dataclass(frozen=True)
class LongCatAvatarConfig:
    """One LongCat-Video-Avatar DiT. Defaults are v1.5's `base_model/config.json` (spec §2.3)."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    model_max_length: int = 512  # text positions the pipeline pads to
    mlp_ratio: int = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # padded text positions stay keys (as zero vectors) instead of being dropped (spec §3.2 step 7)
    text_tokens_zero_pad: bool = True
    # audio projector (spec §3.5): windows of `audio_window` features of audio_block x audio_channel
    audio_window: int = 5
    audio_block: int = 5
    audio_channel: int = 1280
    intermediate_dim: int = 512
    output_dim: int = 768  # audio token width
    context_tokens: int = 32  # audio tokens per latent frame and stream
    vae_scale: int = 4  # video frames per latent frame after the first
    audio_prenorm: bool = False  # an affine LayerNorm on the audio tokens before the audio attention
    # two-speaker Label-RoPE ranges (spec §3.10)
    class_range: int = 24
    class_interval: int = 4
    # constants of the reference code (not in config.json)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    ref_map_head_groups: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 8 for the 3D RoPE")
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size {self.patch_size}: only a temporal patch of 1 is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU inner width: ⌈int(2·mlp_ratio·C/3) / 256⌉·256 (11 008 for C = 4096; spec §2.4)."""
        inner = int(2 * self.hidden_size * self.mlp_ratio / 3)
        return 256 * ((inner + 255) // 256)

    @property
    def audio_vf_window(self) -> int:
        """Audio features per latent frame after the first: window + vae_scale − 1 (8)."""
        return self.audio_window + self.vae_scale - 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, name: str = "config.json") -> LongCatAvatarConfig:
        """The config of a published `config.json` dict; raises CheckpointError naming unknown keys."""
        class_name = raw.get("_class_name", CLASS_NAME)
        if class_name != CLASS_NAME:
            raise CheckpointError(f"_class_name is {class_name!r}; expected {CLASS_NAME!r}", file=name)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - IGNORED_KEYS)
        if unknown:
            raise CheckpointError(
                f"keys not understood: {', '.join(unknown)}; accepted: {', '.join(sorted(known))}", file=name
            )
        values = {k: v for k, v in raw.items() if k in known}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"invalid DiT config: {err}", file=name) from err

    @classmethod
    def from_json(cls, path: Path, *, name: str | None = None) -> LongCatAvatarConfig:
        label = name or path.name
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read the DiT config: {err}", file=label) from err
        if not isinstance(raw, dict):
            raise CheckpointError("the DiT config is not a JSON object", file=label)
        return cls.from_dict(raw, name=label)

    def to_dict(self) -> dict[str, Any]:
        """The architecture keys as the published config.json writes them (constants excluded)."""
        out: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in fields(self):
            if f.name not in ("eps", "rope_theta", "ref_map_head_groups"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# v1.5 `base_model/config.json` (spec §2.3; the INT8 folder's config is the same file).
LONGCAT_AVATAR_15 = LongCatAvatarConfig()
# v1.0 `avatar_single/` and `avatar_multi/`: the wav2vec2 features force audio_block 12 x audio_channel 768;
# the other keys are read from the folder's config.json at load (spec §12 doubt 1), these are the code's
# constructor defaults.
LONGCAT_AVATAR_10 = LongCatAvatarConfig(audio_block=12, audio_channel=768, text_tokens_zero_pad=False)
