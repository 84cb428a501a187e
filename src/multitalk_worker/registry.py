"""The model registry: every talking-video model this engine serves, as data (in the spirit of flux's
`configs`).

All our models share the Wan2.1-I2V-14B base (its DiT config comes from the folder's config.json, see
weights/loader.detect_config) and the same module tree; a model adds an audio adapter (the 330 audio
tensors: `audio_proj.*`, `blocks.N.audio_cross_attn.*`, `blocks.N.norm_x.*`) and a clip rule. An entry
names the adapter files (paths relative to the model folder, the same in the original and the Diffusers
layout), the clip geometry, the length cap, which conditioning sources it takes, its presets, and its
conditioner (pipeline/conditioning.py, keyed by the model's name). weights/, the CLI, the worker and the
pipeline read this table; nothing else names a model's files.

Adding a model: an entry here, its conditioner, its spec section, its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from multitalk_worker.errors import InvalidInput

ModelName = Literal["multitalk", "infinitetalk", "longcat-avatar", "longcat-avatar-1.0"]
SourceKind = Literal["image", "video"]
# The output's length: MultiTalk drops the last clip's reflection padding (La - 3 frames for audio of La),
# InfiniteTalk keeps the audio's frames (spec IT 5.5).
LengthRule = Literal["drop_padding", "audio"]


@dataclass(frozen=True)
class Adapter:
    """One audio-adapter checkpoint: the same 330 keys for every model, other values."""

    name: str  # "multitalk", "single", "multi"
    file: str  # relative to the model folder, in both layouts
    persons: tuple[int, ...]  # speaker counts it is meant for
    what: str  # for messages and manifests
    hub_repo: str  # where the file is published (Hugging Face)
    size_gb: float  # the published file's size as reported (spec), for the docs


@dataclass(frozen=True)
class LongCatFamily:
    """What a LongCat-Video-Avatar version adds to its entry (spec longcat-avatar-inference.md §1.2, §7)."""

    dit_folder: str  # the DiT's folder in the published model folder (spec §2.1, §2.11)
    multi_dit_folder: str  # the DiT for two speakers (1.0 publishes its own; 1.5 uses the same weights)
    audio_folder: str  # its audio encoder's folder
    schedule: Literal["default", "distill", "distill_v1"]  # pipeline/longcat_sampling.py
    shift: float
    # what a continuation's 4 clean latents are while denoising: 1.5 the re-encoded frames, 1.0 the previous
    # segment's own last latents (both decode with the re-encoded ones, §7.6 step 4)
    condition: Literal["reencoded", "latent"]
    negative: str  # the reference's single-speaker default negative prompt (§5)
    # two speakers: the multi script's, the same words with "bright" in lower case (a different token
    # sequence for umT5's case-sensitive tokenizer; tools/parity.py reads both from the demo scripts)
    negative_multi: str

    def default_negative(self, speakers: int) -> str:
        """The negative prompt a job without one gets: the single or the multi script's."""
        return self.negative if speakers == 1 else self.negative_multi


@dataclass(frozen=True)
class ModelSpec:
    name: ModelName
    adapters: tuple[Adapter, ...]
    motion_frames: int  # M: frames of the previous clip that condition the next one
    max_frames: int  # the longest video a job may make, in frames of `fps`
    duration_setting: str  # the Settings field (a MULTITALK_ variable) by which a worker may lower max_frames
    length_rule: LengthRule
    sources: tuple[SourceKind, ...]  # conditioning inputs it takes
    default_preset: str
    presets: tuple[str, ...]  # pipeline/presets.py names it offers
    fps: int = 25  # the output's frame rate: the model's timeline (timeline.py functions take it)
    frames_per_clip: int = 81  # frames one clip (segment) renders
    # the pipeline class that serves the model, "module:Class" (imported when a pipeline is built, so the
    # registry imports no torch)
    pipeline: str = "multitalk_worker.pipeline.pipeline:TalkingVideoPipeline"
    family: LongCatFamily | None = None  # a LongCat-Video-Avatar version's own settings

    def adapter(self, name: str | None = None, *, persons: int = 1) -> Adapter:
        """The adapter called `name`, or the one meant for `persons` speakers."""
        if name is not None:
            for adapter in self.adapters:
                if adapter.name == name:
                    return adapter
            accepted = ", ".join(a.name for a in self.adapters)
            raise InvalidInput(f"model {self.name} has no adapter {name!r}; accepted: {accepted}")
        for adapter in self.adapters:
            if persons in adapter.persons:
                return adapter
        raise InvalidInput(f"model {self.name} has no adapter for {persons} speakers")


MULTITALK = ModelSpec(
    name="multitalk",
    adapters=(
        Adapter(
            "multitalk",
            "multitalk.safetensors",
            (1, 2),
            "MultiTalk audio layers",
            "MeiGen-AI/MeiGen-MultiTalk",
            9.95,
        ),
    ),
    motion_frames=25,
    max_frames=1000,
    duration_setting="max_duration_s",
    length_rule="drop_padding",
    sources=("image",),
    default_preset="default",
    presets=("default", "fusionx", "lightx2v", "fast"),
)

INFINITETALK = ModelSpec(
    name="infinitetalk",
    adapters=(
        Adapter(
            "single",
            "single/infinitetalk.safetensors",
            (1,),
            "InfiniteTalk audio layers, one speaker",
            "MeiGen-AI/InfiniteTalk",
            9.95,
        ),
        Adapter(
            "multi",
            "multi/infinitetalk.safetensors",
            (2,),
            "InfiniteTalk audio layers, two speakers",
            "MeiGen-AI/InfiniteTalk",
            9.95,
        ),
    ),
    motion_frames=9,
    # The reference stops at --max_frame_num (1000 frames = 40 s by default); the loop itself has no limit,
    # so we allow 10 minutes (the video streams to the encoder, spec IT 5.5). Cap a job with max_duration_s.
    max_frames=15_000,
    duration_setting="infinitetalk_max_duration_s",
    length_rule="audio",
    sources=("image", "video"),
    default_preset="default",
    presets=("default", "fusionx", "lightx2v", "fast"),
)

LONGCAT_NEGATIVE = (
    "Close-up, Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused "
    "fingers, still picture, messy background, three legs, many people in the background, walking backwards"
)
LONGCAT_NEGATIVE_MULTI = LONGCAT_NEGATIVE.replace("Bright tones", "bright tones")
LONGCAT_PIPELINE = "multitalk_worker.pipeline.longcat:LongCatPipeline"

LONGCAT_AVATAR = ModelSpec(
    name="longcat-avatar",
    adapters=(),
    motion_frames=13,  # the last 13 frames of a segment condition the next (4 latents)
    max_frames=15_000,  # 10 minutes at 25 fps, as InfiniteTalk
    duration_setting="longcat_max_duration_s",
    length_rule="audio",
    sources=("image", "video"),
    default_preset="longcat-distill",
    presets=("longcat-distill", "longcat-1.5"),
    fps=25,
    frames_per_clip=93,
    pipeline=LONGCAT_PIPELINE,
    family=LongCatFamily(
        dit_folder="base_model",
        multi_dit_folder="base_model",
        audio_folder="whisper-large-v3",
        schedule="distill",  # 8 steps without guidance: the DMD LoRA's schedule (spec §2.7, §7.1)
        shift=7.0,
        condition="reencoded",
        negative=LONGCAT_NEGATIVE,
        negative_multi=LONGCAT_NEGATIVE_MULTI,
    ),
)

LONGCAT_AVATAR_10 = ModelSpec(
    name="longcat-avatar-1.0",
    adapters=(),
    motion_frames=13,
    max_frames=9_600,  # 10 minutes at 16 fps
    duration_setting="longcat_max_duration_s",
    length_rule="audio",
    sources=("image", "video"),
    default_preset="longcat-1.0",
    presets=("longcat-1.0",),
    fps=16,
    frames_per_clip=93,
    pipeline=LONGCAT_PIPELINE,
    family=LongCatFamily(
        dit_folder="avatar_single",
        multi_dit_folder="avatar_multi",
        audio_folder="chinese-wav2vec2-base",
        schedule="default",  # 50 steps with guidance (spec §7.1)
        shift=12.0,
        condition="latent",
        negative=LONGCAT_NEGATIVE,
        negative_multi=LONGCAT_NEGATIVE_MULTI,
    ),
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (MULTITALK, INFINITETALK, LONGCAT_AVATAR, LONGCAT_AVATAR_10)
}
DEFAULT_MODEL: ModelName = "multitalk"


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidInput(f"unknown model {name!r}; accepted: {', '.join(MODELS)}") from None


def models_taking(source: SourceKind) -> str:
    """The models that take a `source` conditioning input, for messages: "'a' or 'b'"."""
    return " or ".join(repr(name) for name, spec in MODELS.items() if source in spec.sources)


def pipeline_class(name: str) -> type:
    """The class that serves model `name` (its entry's `pipeline`), imported now."""
    module, _, attr = get_model(name).pipeline.partition(":")
    return getattr(importlib.import_module(module), attr)


def all_adapters() -> dict[str, Adapter]:
    """Every adapter file of every model, keyed by its path (two models never share a file)."""
    return {adapter.file: adapter for spec in MODELS.values() for adapter in spec.adapters}
