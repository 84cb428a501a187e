"""The one conversion from a parsed job input (schema.GenerateInput) to the pipeline's GenerationRequest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from multitalk_worker.pipeline.presets import apply_preset
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from multitalk_worker.schema import GenerateInput

RANDOM_SEED = -1  # the pipeline draws a seed and reports it


def build_request(
    parsed: GenerateInput,
    *,
    default_model: str,
    image: Path | None,
    video: Path | None,
    audio: list[Path],
) -> GenerationRequest:
    """The request for `parsed` with its inputs at the given local paths."""
    return GenerationRequest(
        model=parsed.model_name(default_model),
        adapter=parsed.adapter_name(default_model),
        image=image,
        video=video,
        speakers=tuple(
            Speaker(path, _region(s.region)) for path, s in zip(audio, parsed.speakers, strict=True)
        ),
        prompt=parsed.prompt,
        audio_mode=parsed.audio_mode,
        negative_prompt=parsed.negative_prompt,
        resolution=parsed.resolution,
        max_duration_s=parsed.max_duration_s,
        sampling=resolve_sampling(parsed, default_model),
        segment_length=parsed.segment_length or "audio",
        vocal_separation=parsed.vocal_separation,
        source_fps=parsed.source_fps or "resample",
        color_reference=parsed.color_reference or "first",
        image_orientation=parsed.image_orientation,
        image_background=parsed.image_background,
    )


def resolve_sampling(parsed: GenerateInput, default_model: str) -> SamplingParams:
    """Preset values for the resolution, then the `advanced` overrides. No seed: the pipeline draws one."""
    adv = parsed.advanced
    base = SamplingParams(
        seed=adv.seed if adv.seed is not None else RANDOM_SEED,
        teacache_threshold=adv.teacache_threshold or None,
        apg=adv.apg if adv.apg is not None else SamplingParams.apg,
        color_correction=adv.color_correction
        if adv.color_correction is not None
        else SamplingParams.color_correction,
    )
    sampling = apply_preset(parsed.preset_name(default_model), parsed.resolution, base)
    overrides = {
        name: getattr(adv, name)
        for name in ("steps", "text_guidance", "audio_guidance", "shift")
        if getattr(adv, name) is not None
    }
    return replace(sampling, **overrides)


def _region(region: object) -> Any:
    return tuple(region) if isinstance(region, list) else region
