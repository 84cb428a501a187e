"""The wire contract: accepted inputs, every refusal typed, random JSON never escapes as another error."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitalk_worker.config import Settings
from multitalk_worker.errors import DurationTooLong, WorkerError
from multitalk_worker.schema import (
    GenerateInput,
    HealthInput,
    JobLimits,
    job_input_json_schema,
    parse_job_input,
    parse_source,
)
from multitalk_worker.timeline import check_length


def job_limits(**env: str) -> JobLimits:
    """This worker's limits as a worker with these settings builds them (the real weights, 720p)."""
    base = {"MULTITALK_WEIGHTS": "/weights", "MULTITALK_MAX_RESOLUTION": "720p"}
    return JobLimits.from_settings(Settings.from_env(base | env))


LIMITS = job_limits()
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()


def job(**fields: Any) -> dict[str, Any]:
    return {
        "image": "inputs/person.png",
        "speakers": [{"audio": "inputs/a.wav"}],
        "prompt": "a person talks",
    } | fields


def refuse(raw: object, code: str = "INVALID_INPUT", **env: str) -> str:
    with pytest.raises(WorkerError) as info:
        parse_job_input(raw, job_limits(**env) if env else LIMITS)
    assert info.value.code == code
    return info.value.message


def test_minimal_job_and_defaults() -> None:
    parsed = parse_job_input(job(), LIMITS)
    assert isinstance(parsed, GenerateInput)
    assert (parsed.resolution, parsed.preset, parsed.audio_mode) == ("480p", None, "parallel")
    assert parsed.preset_name("multitalk") == "default"  # unset: the model's default preset
    assert parsed.preset_name("longcat-avatar") == "longcat-distill"
    assert parsed.output.delivery == "auto" and parsed.validate_only is False
    assert parsed.advanced.steps is None and parsed.max_duration_s is None


def test_full_job() -> None:
    raw = job(
        image="https://example.com/a.png?sig=1",
        speakers=[
            {"audio": "s3://bucket/a.wav", "region": [0.0, 0.1, 0.5, 1.0]},
            {"audio": "data:audio/wav;base64," + PNG_B64, "region": "right"},
        ],
        audio_mode="sequential",
        negative_prompt="blurry",
        resolution="720p",
        max_duration_s=12.5,
        preset="fusionx",
        advanced={"steps": 6, "text_guidance": 1.0, "audio_guidance": 2.5, "shift": 3.0, "seed": 7},
        output={"delivery": "s3", "key": "runs/x.mp4"},
        validate_only=True,
    )
    parsed = parse_job_input(raw, LIMITS)
    assert isinstance(parsed, GenerateInput)
    assert parsed.speakers[0].region == [0.0, 0.1, 0.5, 1.0] and parsed.speakers[1].region == "right"
    assert parsed.advanced.seed == 7 and parsed.output.key == "runs/x.mp4"


def test_health_action() -> None:
    assert isinstance(parse_job_input({"action": "health"}, LIMITS), HealthInput)
    refuse({"action": "health", "image": "x"})
    refuse({"action": "dance"})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (job(colour="red"), "colour: unknown field (accepted: action, image"),
        (job(advanced={"step": 3}), "advanced.step: unknown field (accepted: steps"),
        (job(speakers=[]), "speakers"),
        (job(speakers=[{"audio": "a.wav"}] * 3), "speakers"),
        (job(prompt=""), "prompt"),
        (job(image="http://example.com/a.png"), "only https"),
        (job(image="ftp://example.com/a.png"), "only https"),
        (job(image="https://user:pw@example.com/a.png"), "credentials"),
        (job(image="s3://bucket-only"), "s3://bucket/key"),
        (job(image="data:image/png,rawbytes"), "data:<media type>;base64"),
        (job(resolution="1080p"), "resolution"),
        (job(preset="turbo"), "preset"),
        (job(audio_mode="sequential"), "two speakers"),
        (job(advanced={"steps": 0}), "advanced.steps"),
        (job(advanced={"steps": "8"}), "advanced.steps"),
        (job(advanced={"seed": -1}), "advanced.seed"),
        (job(advanced={"text_guidance": 21}), "advanced.text_guidance"),
        (job(advanced={"color_correction": 1.5}), "advanced.color_correction"),
        (job(speakers=[{"audio": "a.wav", "region": [0.5, 0, 0.2, 1]}]), "x0 < x1"),
        (job(max_duration_s=0), "max_duration_s"),
        (job(output={"delivery": "ftp"}), "output.delivery"),
        (job(output={"delivery": "base64", "path": "a.mp4"}), "output.path applies to delivery volume"),
        (job(output={"delivery": "volume", "path": "../a.mp4"}), "must be relative"),
        (job(output={"delivery": "volume", "path": "a.mov"}), "output.path"),
        (job(validate_only="yes"), "validate_only"),
        ([1, 2], "JSON object, got array"),
        ("text", "JSON object, got a string; as JSON text: body is not valid JSON: Expecting value"),
        (None, "JSON object, got null"),
    ],
)
def test_refusals_name_the_field(raw: object, fragment: str) -> None:
    assert fragment in refuse(raw)


def test_refusals_never_echo_values() -> None:
    secret = "https://example.com/a.png?X-Amz-Signature=deadbeef"
    message = refuse(job(image=secret, advanced={"steps": "A" * 500}))
    assert "deadbeef" not in message and "AAAA" not in message


def test_limits_of_this_worker() -> None:
    assert "MULTITALK_WEIGHTS=tiny" in refuse(job(resolution="tiny"))
    assert parse_job_input(job(resolution="tiny"), job_limits(MULTITALK_WEIGHTS="tiny"))
    assert "up to 480p" in refuse(job(resolution="720p"), MULTITALK_MAX_RESOLUTION="480p")
    message = refuse(job(max_duration_s=20), "DURATION_TOO_LONG", MULTITALK_MAX_DURATION_S="10")
    assert "limit of 10 s (MULTITALK_MAX_DURATION_S); ask for at most 10" in message
    # over the model's own limit (multitalk: 1000 frames) is the same rule with the same code
    message = refuse(job(max_duration_s=41), "DURATION_TOO_LONG")
    assert "max_duration_s=41 exceeds the limit of 40 s" in message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("https://example.com/a.png", "url"),
        ("s3://b/k.wav", "s3"),
        ("data:image/png;base64,AAAA", "data"),
        (PNG_B64, "base64"),
        ("/9j/" + "A" * 80, "base64"),  # JPEG base64 starts with a slash
        ("inputs/person.png", "path"),
        ("/runpod-volume/in/a.wav", "path"),
    ],
)
def test_parse_source(text: str, kind: str) -> None:
    assert parse_source(text).kind == kind


def test_describe_hides_payload_and_query() -> None:
    assert parse_source("https://h.example/a.png?token=abc").describe() == "https://h.example/a.png"
    assert PNG_B64 not in parse_source(PNG_B64).describe()


def test_json_schema_documents_bounds() -> None:
    schema = job_input_json_schema()
    assert schema["additionalProperties"] is False
    steps = schema["$defs"]["AdvancedInput"]["properties"]["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 100)
    json.dumps(schema)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
field_names = st.sampled_from(
    ["image", "speakers", "prompt", "audio_mode", "resolution", "preset", "advanced", "output", "action", "x"]
)
near_jobs = st.dictionaries(field_names, json_values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=json_values | near_jobs)
def test_random_json_gives_a_model_or_a_typed_error(raw: object) -> None:
    try:
        parsed = parse_job_input(raw, LIMITS)
    except WorkerError as error:
        assert error.code in ("INVALID_INPUT", "DURATION_TOO_LONG")
        assert error.message
        json.dumps(error.to_dict())
    else:
        assert isinstance(parsed, GenerateInput | HealthInput)


def test_api_doc_lists_every_field() -> None:
    """docs/api.md documents every field of the contract and every preset."""
    from multitalk_worker.pipeline.presets import PRESETS
    from multitalk_worker.schema import AdvancedInput, OutputInput, SpeakerInput
    from tests.conftest import REPO

    text = (REPO / "docs" / "api.md").read_text()
    for model in (GenerateInput, AdvancedInput, OutputInput, SpeakerInput):
        for name in model.model_fields:
            assert f"`{name}`" in text or f"`speakers[].{name}`" in text, name
    for preset in PRESETS.values():
        row = f"| `{preset.name}` | {preset.steps} | {preset.text_guidance} | {preset.audio_guidance} |"
        assert row in text, preset.name


def test_a_length_counted_up_to_the_limit_is_a_lower_bound() -> None:
    """A decode that stops counting just past the limit (pipeline.video.count_length's max_seconds) knows
    only that the source is at least that long: the one length rule says so, and refuses it the same."""
    with pytest.raises(DurationTooLong, match=r"^video lasts at least 10\.1 s; videos are at most 10 s\. "):
        check_length(10.0, media_s=10.1, what="video", complete=False)
    with pytest.raises(DurationTooLong, match=r"^video lasts 10\.1 s"):
        check_length(10.0, media_s=10.1, what="video")
    check_length(10.0, media_s=10.0, what="video", complete=False)  # within the limit: no refusal
