"""The job's two answers, each built once from the pipeline's one report (PreparedInputs.report): the plan
(what validate_only answers, known before any generation) and the result (schema.JobResult, after it).
The service adds only what the pipeline cannot know: the job's preset, the inputs as fetched, the
delivery, the encoded file's check and the timings."""

from __future__ import annotations

from typing import Any

from multitalk_worker.media import Mp4Info
from multitalk_worker.pipeline.inputs import PreparedInputs
from multitalk_worker.pipeline.presets import PRESETS
from multitalk_worker.pipeline.request import GenerationRequest, GenerationResult
from multitalk_worker.schema import ClipCounts, GenerateInput, JobResult


def job_fields(parsed: GenerateInput) -> dict[str, object]:
    """What the job asked for that the pipeline does not see: its preset's name."""
    return {"preset": parsed.preset, "preset_needs_lora": PRESETS[parsed.preset].needs_lora}


def plan_report(
    parsed: GenerateInput,
    request: GenerationRequest,
    inputs: PreparedInputs,
    picture: dict[str, Any],
    duration_s: float,
    delivery: dict[str, object],
) -> dict[str, Any]:
    """The plan: the inputs as fetched (`picture`: {"image": ...} or {"video": ...}), as decoded, and the
    pipeline's report of what it will make."""
    checked, report = inputs.checked(), inputs.report(request)
    return {
        **picture,
        "bucket": list(checked.bucket),
        "audio_durations_s": list(checked.track_s),
        "audio_cut": checked.audio_cut,
        "duration_s": duration_s,
        "frames": checked.frames,
        "clips": report["clips"],
        "delivery": delivery,
        "source": report["source"],
        "resolved": job_fields(parsed) | report,
    }


def job_result(
    parsed: GenerateInput,
    result: GenerationResult,
    info: Mp4Info,
    size: int,
    *,
    digest: str,
    delivered: dict[str, object],
    timings: dict[str, Any],
    worker: dict[str, str],
    checkpoint_bytes: int = 0,
) -> JobResult:
    """The result: the encoded file as checked, and the pipeline's report of what it made."""
    resolved = job_fields(parsed) | result.resolved
    source = resolved["source"]
    assert isinstance(source, dict)  # PreparedInputs.source_report
    return JobResult(
        video=delivered,
        sha256=digest,
        bytes=size,
        duration_s=info.duration_s,
        audio_duration_s=info.audio_duration_s,
        width=info.width,
        height=info.height,
        fps=info.fps,
        frames=info.frames,
        seed=result.seed,
        model=str(resolved["model"]),
        adapter=str(resolved["adapter"]),
        source=source,
        resolved=resolved,
        timings=timings,
        clips=ClipCounts(
            generated=result.clips_generated,
            resumed=result.clips_resumed,
            resume=result.resume_reason,
            checkpoint_bytes=checkpoint_bytes,
        ),
        worker=worker,
    )
