"""The inputs of one LongCat-Video-Avatar generation, decoded and checked once before any model runs: the
speakers' tracks as the model's streams, the mixed soundtrack, the first frame at its bucket, the person
masks at pixel size, and the segment plan (spec longcat-avatar-inference.md §4.2, §4.6, §6.1-6.5, §7.7).

The plan follows the audio on the model's own timeline (registry entry `fps`): the fewest 93-frame segments
that cover it, trimmed to it, or the reference's whole segments (`segment_length="whole_segments"`).
The image (and a video source's frames) take LongCat's own buckets and LANCZOS resize, the person masks its
bilinear cover-and-crop (pipeline/longcat_image.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline import audio as audio_prep
from multitalk_worker.pipeline import image as image_prep
from multitalk_worker.pipeline import longcat_sampling as ls
from multitalk_worker.pipeline.longcat_audio import stream_tracks, video_frames
from multitalk_worker.pipeline.longcat_image import FACE_MARGIN, longcat_person_masks, prepare_longcat_image
from multitalk_worker.pipeline.longcat_segments import COND_FRAMES, SegmentPlan, plan_segments
from multitalk_worker.pipeline.request import CheckedInputs, GenerationRequest, Region
from multitalk_worker.pipeline.video import VideoSource
from multitalk_worker.pipeline.video import open_source as open_frames
from multitalk_worker.registry import ModelSpec, get_model
from multitalk_worker.timeline import SAMPLE_RATE, resolve_max_frames


@dataclass(frozen=True)
class LongCatInputs:
    spec: ModelSpec
    streams: tuple[np.ndarray, ...]  # 16 kHz mono per stream (person 1, person 2), loudness not applied
    soundtrack: np.ndarray  # the mix, float32, trimmed to the video
    track_s: tuple[float, ...]
    first: image_prep.ConditionImage  # the image (or the video's first frame) at the bucket
    source_frames: torch.Tensor | None  # a video source's last COND_FRAMES frames [1, 3, 13, H, W] in [-1, 1]
    person_masks: torch.Tensor | None  # [3, H, W] 0/1 at the bucket (two speakers), else None
    plan: SegmentPlan

    def close(self) -> None:
        """Nothing is held open (the source was read while preparing)."""

    def report(self, request: GenerationRequest) -> dict[str, object]:
        """The one report of what this request will make (as PreparedInputs.report): the service's plan and,
        with the seed drawn and the weights, the pipeline's result."""
        plan = self.plan
        sampling = resolve_sampling(request, self.spec)
        return {
            "model": request.model,
            "adapter": None,
            "source": {"kind": "image" if self.source_frames is None else "video"},
            "resolution": request.resolution,
            "bucket": list(self.first.bucket),
            "persons": len(request.speakers),
            "audio_mode": request.audio_mode,
            "max_duration_s": request.max_duration_s,
            "fps": self.spec.fps,
            "clips": len(plan.segments),
            "segments": len(plan.segments),
            "segment_length": request.segment_length,
            "vocal_separation": request.vocal_separation,
            "rendered_frames": plan.rendered_frames,
            "frames": plan.output_frames,
            "steps": sampling.steps,
            "schedule": sampling.mode,
            "shift": sampling.shift,
            "text_guidance": sampling.text_scale,
            "audio_guidance": sampling.audio_scale,
            "passes_per_step": len(ls.guidance_passes(sampling.text_scale, sampling.audio_scale)),
            "negative_prompt": "default" if request.negative_prompt is None else "custom",
            "seed": request.sampling.seed if request.sampling.seed >= 0 else None,
        }

    def checked(self) -> CheckedInputs:
        return CheckedInputs(
            track_s=self.track_s,
            audio_s=self.streams[0].shape[0] / SAMPLE_RATE,
            audio_cut=False,
            bucket=self.first.bucket,
            source_size=self.first.source_size,
            frames=self.plan.output_frames,
        )


@dataclass(frozen=True)
class LongCatSampling:
    steps: int
    mode: ls.ScheduleMode
    shift: float
    text_scale: float
    audio_scale: float


def resolve_sampling(request: GenerationRequest, spec: ModelSpec) -> LongCatSampling:
    """Steps, schedule, shift and the two guidance scales. The family's distilled schedule serves the request
    that asks for its 8 steps without guidance (preset longcat-distill); any other takes the reference's
    non-distilled linear schedule (§7.1)."""
    params, family = request.sampling, spec.family
    assert family is not None  # a LongCat entry
    shift = params.shift if params.shift is not None else family.shift
    scales = (params.text_guidance, params.audio_guidance)
    mode: ls.ScheduleMode = family.schedule
    if mode == "distill" and (params.steps != ls.DISTILL_STEPS or ls.guidance_on(*scales)):
        mode = "default"
    return LongCatSampling(params.steps, mode, shift, *scales)


def check_longcat_params(request: GenerationRequest) -> ModelSpec:
    """The request's own values for a LongCat model (no file read)."""
    spec = get_model(request.model)
    if (request.image is None) == (request.video is None):
        raise InvalidInput("give exactly one of image and video")
    if not request.prompt.strip():
        raise InvalidInput("prompt is empty; describe the scene")
    if request.adapter is not None:
        raise InvalidInput(f"model {spec.name} has no audio adapters; leave adapter unset")
    if request.sampling.steps < 1:
        raise InvalidInput(f"steps={request.sampling.steps} is not accepted; use 1 or more")
    if request.sampling.shift is not None and request.sampling.shift <= 0:
        raise InvalidInput(f"shift={request.sampling.shift} is not accepted; use a value > 0")
    return spec


def _source_frames(path: Path, bucket: tuple[int, int], resolution: str) -> tuple[torch.Tensor, int]:
    """A video source's last COND_FRAMES frames at `bucket`, [1, 3, 13, H, W] in [-1, 1], and its frame
    count (read on its own timeline; a shorter video holds its last frame)."""
    source = VideoSource(path, fps_mode="reference")
    try:
        count = max(1, source.info.source_frames)
        first = max(0, count - COND_FRAMES)
        frames = []
        for index in range(first, first + COND_FRAMES):
            prepared = prepare_longcat_image(source.frame(min(index, count - 1)), resolution)
            if prepared.bucket != bucket:
                raise InvalidInput(f"video frame {index} has another size than frame 0")
            frames.append(prepared.pixels)
    finally:
        source.close()
    return torch.cat(frames, dim=2), count


def prepare_longcat_inputs(request: GenerationRequest) -> LongCatInputs:
    """Decode and check every input of `request` for its LongCat model."""
    spec = check_longcat_params(request)
    if not 1 <= len(request.speakers) <= 2:
        raise InvalidInput(f"{len(request.speakers)} speakers given; one or two are accepted")
    signals = [audio_prep.read_track(Path(s.audio)) for s in request.speakers]
    streams = stream_tracks(signals, request.audio_mode, others=False)
    mix = audio_prep.combine_tracks(streams, "parallel").soundtrack if len(streams) > 1 else streams[0]
    frames = video_frames(streams[0].shape[0], spec.fps)
    if frames < 1:
        raise InvalidInput(f"audio is shorter than one frame at {spec.fps} fps")
    audio_s = streams[0].shape[0] / SAMPLE_RATE
    max_frames = resolve_max_frames(request.max_duration_s, audio_s, spec.max_frames, fps=spec.fps)
    plan = plan_segments(frames, max_frames, request.segment_length)
    path = request.image if request.image is not None else request.video
    assert path is not None
    source = open_frames(Path(path), kind="image" if request.image is not None else "video")
    try:
        first = prepare_longcat_image(source.frame(0), request.resolution)
    finally:
        source.close()
    conditioning = None
    if request.video is not None:
        conditioning, _ = _source_frames(Path(request.video), first.bucket, request.resolution)
    masks = None
    if len(streams) > 1:
        regions: list[Region | None] = [s.region for s in request.speakers]
        boxes = image_prep.person_boxes(regions, *first.source_size, margin=FACE_MARGIN)
        assert boxes is not None  # two speakers
        masks = longcat_person_masks(boxes, first.source_size, first.bucket)
        image_prep.check_masks_visible(masks, 2)
    soundtrack = np.ascontiguousarray(mix[: plan.output_frames * SAMPLE_RATE // spec.fps])
    return LongCatInputs(
        spec=spec,
        streams=tuple(streams),
        soundtrack=soundtrack,
        track_s=tuple(s.shape[0] / SAMPLE_RATE for s in signals),
        first=first,
        source_frames=conditioning,
        person_masks=masks,
        plan=plan,
    )
