"""The model registry: every model has a conditioner, adapters are distinct, and the rules it names hold."""

from __future__ import annotations

import pytest

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.conditioning import CONDITIONERS
from multitalk_worker.registry import (
    INFINITETALK,
    LONGCAT_AVATAR,
    LONGCAT_AVATAR_10,
    MODELS,
    MULTITALK,
    all_adapters,
    get_model,
    pipeline_class,
)
from multitalk_worker.timeline import FRAMES_PER_CLIP, duration_limit_s, latent_frames


def test_every_model_has_a_pipeline_and_a_clip_geometry() -> None:
    wan = {name for name, spec in MODELS.items() if spec.family is None}
    assert set(CONDITIONERS) == wan  # the Wan pipeline's models: one conditioner each
    for name, spec in MODELS.items():
        assert callable(pipeline_class(name).from_pretrained)
        assert 0 < spec.motion_frames < spec.frames_per_clip and (spec.motion_frames - 1) % 4 == 0
        assert (spec.frames_per_clip - 1) % 4 == 0
        assert spec.max_frames > spec.frames_per_clip and "image" in spec.sources
        assert spec.default_preset in spec.presets
    assert FRAMES_PER_CLIP == MULTITALK.frames_per_clip == INFINITETALK.frames_per_clip
    assert (LONGCAT_AVATAR.fps, LONGCAT_AVATAR_10.fps) == (25, 16)  # spec longcat §6.6
    assert duration_limit_s(LONGCAT_AVATAR_10.max_frames, LONGCAT_AVATAR_10.fps) == 600.0


def test_adapter_files_are_distinct_and_chosen_by_speakers() -> None:
    assert len(all_adapters()) == sum(len(spec.adapters) for spec in MODELS.values())
    assert MULTITALK.adapter(persons=1).file == MULTITALK.adapter(persons=2).file == "multitalk.safetensors"
    assert INFINITETALK.adapter(persons=1).file == "single/infinitetalk.safetensors"
    assert INFINITETALK.adapter(persons=2).file == "multi/infinitetalk.safetensors"
    assert INFINITETALK.adapter("multi", persons=1).name == "multi"
    with pytest.raises(InvalidInput, match="accepted: single, multi"):
        INFINITETALK.adapter("double")
    with pytest.raises(
        InvalidInput, match="accepted: multitalk, infinitetalk, longcat-avatar, longcat-avatar-1.0"
    ):
        get_model("omnitalk")
    assert LONGCAT_AVATAR.adapters == () and LONGCAT_AVATAR_10.adapters == ()


def test_motion_latents_of_the_references() -> None:
    assert latent_frames(MULTITALK.motion_frames) == 7  # MultiTalk: y latent frames 0-6 are known
    assert latent_frames(INFINITETALK.motion_frames) == 3  # InfiniteTalk: 3 clean motion latents
