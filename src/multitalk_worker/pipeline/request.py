"""Typed request and result of one generation: the engine's API, shared by the CLI, HTTP API and worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from multitalk_worker.registry import ModelName

if TYPE_CHECKING:
    import numpy as np  # annotations only: the CLI's --help imports this module

# A region is [x0, y0, x1, y1] normalised to the input image (x right, y down, 0..1), or a shorthand:
# left/right are the reference's default two-person masks, full the whole image. Regions apply to two
# speakers only; give both or neither (neither: left and right). See pipeline/image.py.
Region = tuple[float, float, float, float] | Literal["left", "right", "full"]
AudioMode = Literal["parallel", "sequential"]
Resolution = Literal["480p", "720p", "tiny"]  # "tiny": 32-64 px buckets, for the tiny model only
# How a video source's frames are placed on the 25 fps timeline: "resample" by presentation time (our
# default, a deliberate deviation), "reference" frame n = the n-th decoded frame (the reference's reading,
# exact for 25 fps sources only; spec IT 4.4).
SourceFps = Literal["resample", "reference"]
# InfiniteTalk's colour reference: source frame 0 (the reference), or each clip's own reference frame.
ColorReference = Literal["first", "clip"]


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


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    speakers: tuple[Speaker, ...]
    prompt: str
    model: ModelName = "multitalk"
    image: Path | None = None  # exactly one of image and video
    video: Path | None = None  # the source to dub (infinitetalk only)
    adapter: str | None = None  # None: the model's adapter for the number of speakers
    source_fps: SourceFps = "resample"
    color_reference: ColorReference = "first"
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


@dataclass(frozen=True)
class VideoSpec:
    """What a sink receives before the first frame: the video's size and length and its soundtrack."""

    width: int
    height: int
    frames: int
    fps: int
    audio: np.ndarray  # float32 mono, already trimmed to frames / fps seconds
    sample_rate: int


class FrameSink(Protocol):
    """Takes the video as it is made: `open` once, then `write` each clip's final frames (uint8
    [n, H, W, 3]) in order. The caller closes it."""

    def open(self, spec: VideoSpec) -> None: ...

    def write(self, frames: np.ndarray) -> None: ...


@dataclass
class GenerationResult:
    frames: np.ndarray | None  # uint8 [N, H, W, 3]; None when the frames went to a sink
    frame_count: int
    size: tuple[int, int]  # (height, width)
    audio: np.ndarray  # float32 mono soundtrack at `sample_rate`, already trimmed to N / fps seconds
    sample_rate: int
    fps: int
    seed: int
    timings: dict[str, float]  # seconds per stage
    resolved: dict[str, object]  # the parameters actually used (steps, shift, bucket, clips, ...)
    clips_generated: int = 0  # clips made by this call
    clips_resumed: int = 0  # clips an earlier run of the job made (read from its checkpoint)
    resume_reason: str | None = None  # with a checkpoint: what opening it found
