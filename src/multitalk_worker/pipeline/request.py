"""Typed request and result of one generation: the engine's API, shared by the CLI, HTTP API and worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

# A region is [x0, y0, x1, y1] normalised to the input image (x right, y down, 0..1), or a shorthand:
# left/right are the reference's default two-person masks, full the whole image. Regions apply to two
# speakers only; give both or neither (neither: left and right). See pipeline/image.py.
Region = tuple[float, float, float, float] | Literal["left", "right", "full"]
AudioMode = Literal["parallel", "sequential"]
Resolution = Literal["480p", "720p", "tiny"]  # "tiny": 32-64 px buckets, for the tiny model only


@dataclass(frozen=True)
class Speaker:
    audio: Path
    region: Region | None = None


@dataclass(frozen=True)
class SamplingParams:
    steps: int = 40
    text_guidance: float = 5.0
    audio_guidance: float = 4.0
    shift: float | None = None  # None: 7 for 480p, 11 for 720p (spec 1.2)
    seed: int = 42  # negative: a random seed in [0, 99 999 999], reported in the result
    teacache_threshold: float | None = None  # None: TeaCache off
    apg: bool = False
    color_correction: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    image: Path
    speakers: tuple[Speaker, ...]
    prompt: str
    audio_mode: AudioMode = "parallel"  # two speakers: parallel pads the shorter track with silence
    negative_prompt: str | None = None  # None: the reference's default negative prompt
    resolution: Resolution = "480p"
    max_duration_s: float | None = None  # None: as long as the audio (longer than 40 s: DurationTooLong)
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class CheckedInputs:
    """What `check_inputs` found: the plan a validate_only answer reports."""

    track_s: tuple[float, ...]  # seconds decoded of each speaker's track (a capped job: its start)
    audio_s: float  # the combined soundtrack
    audio_cut: bool  # a track was longer than the job can use and was cut (max_duration_s)
    bucket: tuple[int, int]  # (H, W)
    source_size: tuple[int, int]  # the image's (H, W)
    frames: int  # frames of the video


@dataclass(frozen=True)
class Progress:
    stage: str  # "audio", "image", "text", "sample", "decode"
    chunk: int  # 1-based clip index
    chunks: int
    step: int  # 1-based denoising step within the clip (0 outside sampling)
    steps: int


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 mono soundtrack at `sample_rate`, already trimmed to N / fps seconds
    sample_rate: int
    fps: int
    seed: int
    timings: dict[str, float]  # seconds per stage
    resolved: dict[str, object]  # the parameters actually used (steps, shift, bucket, clips, ...)
