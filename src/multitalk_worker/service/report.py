"""The plan a job reports (validate_only answers it; the result carries it): inputs, clips, resolved
parameters and, for a video source, how the source covers the output."""

from __future__ import annotations

from typing import Any

from multitalk_worker.pipeline.inputs import PreparedInputs
from multitalk_worker.pipeline.longcat_inputs import LongCatInputs
from multitalk_worker.pipeline.presets import PRESETS
from multitalk_worker.pipeline.request import CheckedInputs, GenerationRequest
from multitalk_worker.pipeline.video import VideoInfo
from multitalk_worker.registry import get_model
from multitalk_worker.schema import GenerateInput
from multitalk_worker.service.request import RANDOM_SEED


def plan_report(
    parsed: GenerateInput,
    request: GenerationRequest,
    picture_report: dict[str, Any],
    checked: CheckedInputs,
    duration_s: float,
    delivery: dict[str, Any],
) -> dict[str, Any]:
    picture = picture_report.get("image") or picture_report["video"]
    sampling = request.sampling
    preset = parsed.preset_name(request.model)
    return {
        "image" if "image" in picture_report else "video": picture,
        "bucket": list(checked.bucket),
        "audio_durations_s": list(checked.track_s),
        "audio_cut": checked.audio_cut,
        "duration_s": duration_s,
        "frames": checked.frames,
        "delivery": delivery,
        "resolved": {
            "model": request.model,
            "adapter": request.adapter,
            "preset": preset,
            "preset_needs_lora": PRESETS[preset].needs_lora,
            "fps": get_model(request.model).fps,
            "resolution": request.resolution,
            "audio_mode": request.audio_mode,
            "speakers": len(request.speakers),
            "max_duration_s": request.max_duration_s,
            "color_reference": request.color_reference if request.video is not None else None,
            "steps": sampling.steps,
            "text_guidance": sampling.text_guidance,
            "audio_guidance": sampling.audio_guidance,
            "shift": sampling.shift,
            "seed": sampling.seed if sampling.seed != RANDOM_SEED else None,
            "teacache_threshold": sampling.teacache_threshold,
            "apg": sampling.apg,
            "color_correction": sampling.color_correction,
        },
    }


def source_plan(inputs: PreparedInputs | LongCatInputs, video: VideoInfo | None) -> dict[str, Any]:
    """The clip plan and, for a video source, its frame rate and whether its last frame will be held.

    The output follows the speech; each clip is conditioned on the source frame at its start (spec IT 5),
    so a clip starting past the source's end takes its last frame, held: `last_frame_held_from` is that
    clip's start and `frames_held` the output frames from there on (what the result's `source` reports
    after the run). `frames_past_end`: output frames after the source's last frame."""
    plan = inputs.plan
    if not isinstance(inputs, PreparedInputs):  # a LongCat model's inputs report their own segment plan
        return inputs.plan_report()
    out: dict[str, Any] = {"clips": len(plan.starts), "frames": plan.output_frames}
    if video is None:
        out["source"] = {"kind": "image"}
        return out
    covered = video.timeline_frames
    held_from = next((start for start in plan.starts if start >= covered), None)
    out["source"] = {
        "kind": "video",
        "fps": video.source_fps,
        "frames": video.source_frames,
        "duration_s": video.duration_s,
        "fps_mode": inputs.source_report()["fps_mode"],
        "last_frame_held": held_from is not None,
        "last_frame_held_from": held_from,
        "frames_held": 0 if held_from is None else plan.output_frames - held_from,
        "frames_past_end": max(0, plan.output_frames - covered),
    }
    return out
