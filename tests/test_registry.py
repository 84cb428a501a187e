"""The model registry: every model has a conditioner, adapters are distinct, and the rules it names hold."""

from __future__ import annotations

import pytest

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.conditioning import CONDITIONERS
from multitalk_worker.registry import INFINITETALK, MODELS, MULTITALK, all_adapters, get_model
from multitalk_worker.timeline import FRAMES_PER_CLIP, latent_frames


def test_every_model_has_a_conditioner_and_a_clip_geometry() -> None:
    assert set(CONDITIONERS) == set(MODELS)
    for spec in MODELS.values():
        assert 0 < spec.motion_frames < FRAMES_PER_CLIP and (spec.motion_frames - 1) % 4 == 0
        assert spec.max_frames > FRAMES_PER_CLIP and "image" in spec.sources


def test_adapter_files_are_distinct_and_chosen_by_speakers() -> None:
    assert len(all_adapters()) == sum(len(spec.adapters) for spec in MODELS.values())
    assert MULTITALK.adapter(persons=1).file == MULTITALK.adapter(persons=2).file == "multitalk.safetensors"
    assert INFINITETALK.adapter(persons=1).file == "single/infinitetalk.safetensors"
    assert INFINITETALK.adapter(persons=2).file == "multi/infinitetalk.safetensors"
    assert INFINITETALK.adapter("multi", persons=1).name == "multi"
    with pytest.raises(InvalidInput, match="accepted: single, multi"):
        INFINITETALK.adapter("double")
    with pytest.raises(InvalidInput, match="accepted: multitalk, infinitetalk"):
        get_model("omnitalk")


def test_motion_latents_of_the_references() -> None:
    assert latent_frames(MULTITALK.motion_frames) == 7  # MultiTalk: y latent frames 0-6 are known
    assert latent_frames(INFINITETALK.motion_frames) == 3  # InfiniteTalk: 3 clean motion latents
