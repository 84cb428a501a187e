"""One set of input checks for a generation, run before any model: the request's values, the audio, the
conditioning source (image or video), the regions, the length. `prepare_inputs` decodes each input once;
the pipeline takes its result, so a caller that validates first (the worker, the CLI) decodes nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline import audio as audio_prep
from multitalk_worker.pipeline import image as image_prep
from multitalk_worker.pipeline.plan import ClipPlan, plan_clips
from multitalk_worker.pipeline.presets import default_shift
from multitalk_worker.pipeline.request import CheckedInputs, GenerationRequest, Region
from multitalk_worker.pipeline.sampling import guidance_passes
from multitalk_worker.pipeline.video import ImageSource, SourceFrames, VideoSource
from multitalk_worker.pipeline.video import open_source as open_frames
from multitalk_worker.registry import ModelSpec, get_model, models_taking
from multitalk_worker.timeline import FPS, FRAMES_PER_CLIP, SAMPLE_RATE, VAE_STRIDE, resolve_max_frames

AUDIO_CONTEXT_S = 1.0  # audio decoded past a capped job's last window: wav2vec2 context at the cut


@dataclass
class PreparedInputs:
    """Every input of one request, decoded and checked; `close()` releases the source."""

    spec: ModelSpec
    audio: audio_prep.PreparedAudio
    source: SourceFrames
    first: image_prep.ConditionImage  # frame 0 (or the image) at the bucket
    person_masks: torch.Tensor  # [3, h, w] float32 (CPU)
    plan: ClipPlan

    def source_report(self) -> dict[str, object]:
        """What the plan and the result say of the source: its kind and, for a video, its rate and length
        and whether its last frame will be held. Each clip is conditioned on the source frame at its start
        (spec IT 5), so a clip starting past the source's end takes its last frame, held:
        `last_frame_held_from` is that clip's start and `frames_held` the output frames from there on;
        `frames_past_end`: the output frames after the source's last frame."""
        if isinstance(self.source, ImageSource):
            return {"kind": "image", **self.source.report}
        if not isinstance(self.source, VideoSource):
            return {"kind": "image"}
        info, plan = self.source.info, self.plan
        covered = info.timeline_frames
        held = next((start for start in plan.starts if start >= covered), None)
        return {
            "kind": "video",
            "fps": float(info.source_fps),
            "frames": info.source_frames,
            "duration_s": info.duration_s,
            "counted_by": info.counted_by,
            "fps_mode": self.source.fps_mode,
            "last_frame_held": held is not None,
            "last_frame_held_from": held,
            "frames_held": 0 if held is None else plan.output_frames - held,
            "frames_past_end": max(0, plan.output_frames - covered),
        }

    def report(self, request: GenerationRequest) -> dict[str, object]:
        """The one report of what this request will make, known before any generation: the service's plan
        (validate_only) and the pipeline's result (which adds the seed drawn and the weights) both are it."""
        plan, sampling = self.plan, request.sampling
        return {
            "model": request.model,
            "adapter": request.adapter,
            "source": self.source_report(),
            "resolution": request.resolution,
            "bucket": list(self.first.bucket),
            "persons": len(request.speakers),
            "audio_mode": request.audio_mode,
            "audio_s": self.audio.num_samples / SAMPLE_RATE,
            "audio_padded_s": self.audio.padded_s,
            "max_duration_s": request.max_duration_s,
            "mode": "streaming" if plan.streaming else "clip",
            "max_frames": plan.max_frames,
            "clips": len(plan.starts),
            "frames": plan.output_frames,
            "steps": sampling.steps,
            "shift": sampling.shift if sampling.shift is not None else default_shift(request.resolution),
            "text_guidance": sampling.text_guidance,
            "audio_guidance": sampling.audio_guidance,
            "passes_per_step": len(guidance_passes(sampling.text_guidance)),
            "apg": sampling.apg,
            "teacache_threshold": sampling.teacache_threshold,
            "color_correction": sampling.color_correction,
            "color_reference": request.color_reference if request.video is not None else None,
            "negative_prompt": "default" if request.negative_prompt is None else "custom",
            "seed": sampling.seed if sampling.seed >= 0 else None,  # None: the pipeline draws one
        }

    def checked(self) -> CheckedInputs:
        """What a validate_only answer reports of these inputs."""
        return CheckedInputs(
            track_s=self.audio.track_s,
            audio_s=self.audio.num_samples / SAMPLE_RATE,
            audio_cut=self.audio.cut,
            bucket=self.first.bucket,
            source_size=self.first.source_size,
            frames=self.plan.output_frames,
        )

    def close(self) -> None:
        self.source.close()


def check_resolution(request: GenerationRequest, *, tiny_model: bool) -> None:
    """The tiny resolution is the built-in tiny model's (or a folder of its sizes) alone."""
    if request.resolution == "tiny" and not tiny_model:
        raise InvalidInput("resolution 'tiny' exists only for the built-in tiny model; use 480p or 720p")


def check_params(request: GenerationRequest, *, tiny_model: bool) -> ModelSpec:
    """Checks of the request's own values (no file is read); the request's model."""
    spec = get_model(request.model)
    params = request.sampling
    if (request.image is None) == (request.video is None):
        raise InvalidInput("give exactly one of image and video")
    if request.video is not None and "video" not in spec.sources:
        raise InvalidInput(
            f"model {spec.name} animates an image; a video source needs model {models_taking('video')}"
        )
    check_resolution(request, tiny_model=tiny_model)
    if params.steps < 1:
        raise InvalidInput(f"steps={params.steps} is not accepted; use 1 or more")
    if not 0.0 <= params.color_correction <= 1.0:
        raise InvalidInput(f"color_correction={params.color_correction} is not accepted; use 0..1")
    if params.teacache_threshold is not None and params.teacache_threshold <= 0:
        raise InvalidInput("teacache_threshold must be > 0 (None turns TeaCache off)")
    if params.shift is not None and params.shift <= 0:
        raise InvalidInput(f"shift={params.shift} is not accepted; use a value > 0")
    if not request.prompt.strip():
        raise InvalidInput("prompt is empty; describe the scene")
    if request.adapter is not None:
        spec.adapter(request.adapter)  # an unknown name lists the accepted ones
    image_prep.check_orientation(request.image_orientation)
    image_prep.parse_background(request.image_background)
    return spec


def open_source(request: GenerationRequest) -> SourceFrames:
    """The conditioning source: the image, or the video read forward on the 25 fps timeline."""
    if request.image is not None:
        return open_frames(
            Path(request.image),
            kind="image",
            orientation=request.image_orientation,
            background=request.image_background,
        )
    assert request.video is not None  # check_params
    return open_frames(Path(request.video), kind="video", fps_mode=request.source_fps)


def audio_budget(max_duration_s: float | None, spec: ModelSpec) -> audio_prep.AudioBudget:
    """How much of each track a request can use (docs/api.md, "Cost"). With a cap: up to the end of its
    last planned clip plus the frame windows' reach and AUDIO_CONTEXT_S, so the clip plan is the one the
    whole track gives; without: the model's length limit plus the reflection padding's frames, a longer
    track being refused (the duration rule, made while decoding)."""
    if max_duration_s is None:
        return audio_prep.AudioBudget((spec.max_frames + 5) / FPS, cut=False)
    max_frames = resolve_max_frames(max_duration_s, 0.0, spec.max_frames)  # with a cap, length is irrelevant
    plan = plan_clips(spec.max_frames * 2, max_frames, spec.motion_frames, spec.length_rule)
    end = plan.starts[-1] + FRAMES_PER_CLIP + max(audio_prep.WINDOW_OFFSETS) + 1
    return audio_prep.AudioBudget(end / FPS + AUDIO_CONTEXT_S, cut=True)


def person_masks(request: GenerationRequest, first: image_prep.ConditionImage) -> torch.Tensor:
    """The [3, h, w] person masks at latent size, from the regions on frame 0 (spec MT 3.5)."""
    latent_size = (first.bucket[0] // VAE_STRIDE[1], first.bucket[1] // VAE_STRIDE[2])
    regions: list[Region | None] = [speaker.region for speaker in request.speakers]
    boxes = image_prep.person_boxes(regions, *first.source_size)
    masks = image_prep.person_masks(boxes, first.source_size, first.bucket, latent_size)
    image_prep.check_masks_visible(masks, len(regions))
    return masks


def prepare_inputs(request: GenerationRequest, *, tiny_model: bool) -> PreparedInputs:
    """Decode and check every input of `request`: values, audio files and lengths, duration, source,
    regions. Cheap next to generation (decoding only); lets a caller fail before loading weights."""
    spec = check_params(request, tiny_model=tiny_model)
    budget = audio_budget(request.max_duration_s, spec)
    prepared = audio_prep.prepare_audio(
        [s.audio for s in request.speakers], request.audio_mode, FRAMES_PER_CLIP, budget
    )
    audio_s = prepared.num_samples / SAMPLE_RATE
    max_frames = resolve_max_frames(request.max_duration_s, audio_s, spec.max_frames)
    plan = plan_clips(prepared.frames, max_frames, spec.motion_frames, spec.length_rule)
    source = open_source(request)
    try:
        first = image_prep.prepare_image(source.frame(0), request.resolution)
        masks = person_masks(request, first)
    except BaseException:
        source.close()
        raise
    if source.still:
        source.close()  # an image: `first` serves every clip; the full-size picture is not held
    return PreparedInputs(spec, prepared, source, first, masks, plan)


def check_inputs(request: GenerationRequest, *, tiny_model: bool) -> CheckedInputs:
    """Every input check of a generation without any model: the one set of checks of the CLI, the
    worker's jobs and its validate_only."""
    inputs = prepare_inputs(request, tiny_model=tiny_model)
    inputs.close()
    return inputs.checked()
