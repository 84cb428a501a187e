"""One worker, both models, on the tiny model: MultiTalk and InfiniteTalk jobs (image to video and dubbing)
through the runpod SDK's `run_job`, the adapters resident and swapped in place, against the real loopback
https and S3 servers. Five generations in all (1 step, one clip each); every failing job fails before the
GPU stage, and the job after it on the same worker succeeds.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from multitalk_worker.config import Settings
from multitalk_worker.io.delivery import deliver_s3
from multitalk_worker.io.fetch import sniff
from multitalk_worker.io.s3 import make_s3_client
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES, REPO
from tests.media_files import audio_only_file, write_video
from tests.servers import OUTPUT_BUCKET, HttpsServer, S3Server
from tests.test_worker import error_of, run

FAST = {"resolution": "tiny", "max_duration_s": 0.4, "advanced": {"steps": 1, "seed": 3}}
SOURCE_FRAMES = 5  # 0.2 s at 25 fps: the 10-frame output runs 5 frames past its end


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("volume")
    (root / "inputs").mkdir()
    for name in ("person.png", "two_people.png", "speech_a.wav", "speech_b.wav"):
        (root / "inputs" / name).write_bytes((EXAMPLES / name).read_bytes())
    write_video(root / "inputs" / "source.mp4", SOURCE_FRAMES)
    write_video(root / "inputs" / "long.mp4", 50)  # 2 s: over the 1 s cap of these tests
    audio_only_file(root / "inputs" / "audio_only.mp4", "mp4")
    (root / "inputs" / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    (root / "inputs" / "large.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 400_000)
    return root


def settings_for(volume: Path, tmp: Path, **env: str) -> Settings:
    base = {
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_DEVICE": "cpu",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_ALLOW_LOOPBACK": "true",
        "MULTITALK_FETCH_TIMEOUT_S": "5",
        "MULTITALK_VIDEO_CRF": "0",  # lossless: videos of two workers compare frame for frame
        "MULTITALK_MAX_INPUT_MB": "0.3",
        "MULTITALK_INFINITETALK_MAX_DURATION_S": "1",
        "MULTITALK_REVISION_FILE": str(tmp / "REVISION"),
        "MULTITALK_LOCK_FILE": str(REPO / "requirements.lock"),
    }
    return Settings.from_env({**base, **env})


def image_job(**fields: Any) -> dict[str, Any]:
    base = {"image": "inputs/person.png", "speakers": [{"audio": "inputs/speech_a.wav"}], "prompt": "a talk"}
    return base | FAST | {"output": {"delivery": "base64"}} | fields


def dub_job(video: str, **fields: Any) -> dict[str, Any]:
    base = {"model": "infinitetalk", "video": video, "speakers": [{"audio": "inputs/speech_a.wav"}]}
    return base | {"prompt": "a talk"} | FAST | fields


def decoded(data: bytes, tmp: Path, name: str) -> tuple[np.ndarray, float]:
    """The frames (uint8 [N, H, W, 3]) and the soundtrack's length in s of an mp4."""
    path = tmp / name
    path.write_bytes(data)
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio_s = sum(f.samples / f.sample_rate for f in container.decode(audio=0))
    return frames, audio_s


def output_of(result: dict[str, Any]) -> dict[str, Any]:
    """The output of a job that succeeded (the runpod SDK's `{"output": ...}`)."""
    assert "error" not in result, result
    return result["output"]


def base64_video(output: dict[str, Any]) -> bytes:
    return base64.b64decode(output["video"]["base64"])


@pytest.fixture(scope="module")
def served(
    volume: Path, https_server: HttpsServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One worker serving multitalk -> (failing video jobs) -> infinitetalk dubbing -> multitalk."""
    tmp = tmp_path_factory.mktemp("served")
    url = https_server.add("/v/source.mp4", (volume / "inputs" / "source.mp4").read_bytes(), "video/mp4")
    settings = settings_for(volume, tmp, MULTITALK_CA_BUNDLE=str(https_server.ca_bundle), **s3_server.env())
    worker = JobService(settings)
    out: dict[str, Any] = {"tmp": tmp, "url": url}
    out["first"] = output_of(run(worker, image_job(), "mt-1"))
    out["errors"] = {
        name: run(worker, dub_job(f"inputs/{name}.mp4"), f"bad-{name}")
        for name in ("garbage", "audio_only", "large", "long")
    }
    out["plan"] = output_of(run(worker, dub_job(url, validate_only=True), "plan"))
    out["dub"] = output_of(run(worker, dub_job(url, output={"delivery": "s3", "key": "dub.mp4"}), "it-1"))
    out["again"] = output_of(run(worker, image_job(), "mt-2"))
    out["health"] = output_of(run(worker, {"action": "health"}, "health"))
    body = s3_server.client().get_object(Bucket=OUTPUT_BUCKET, Key="multitalk/dub.mp4")["Body"].read()
    out["dub_bytes"] = body
    yield out


def test_bad_videos_get_their_typed_errors(served: dict[str, Any]) -> None:
    codes = {name: error_of(result) for name, result in served["errors"].items()}
    assert {name: e["code"] for name, e in codes.items()} == {
        "garbage": "VIDEO_DECODE_FAILED",
        "audio_only": "VIDEO_DECODE_FAILED",
        "large": "INPUT_TOO_LARGE",
        "long": "DURATION_TOO_LONG",
    }
    assert all(e["retryable"] is False for e in codes.values())
    assert "2.0 s" in codes["long"]["message"] and "at most 1 s" in codes["long"]["message"]
    assert served["plan"]["validate_only"] and served["dub"]["frames"] == 10  # the jobs after them succeed


def test_validate_only_plans_the_dub(served: dict[str, Any]) -> None:
    plan = served["plan"]["plan"]
    assert (plan["clips"], plan["frames"]) == (1, 10)
    assert plan["resolved"]["model"] == "infinitetalk" and plan["resolved"]["adapter"] == "single"
    source = plan["source"]
    assert (source["kind"], source["fps"], source["frames"]) == ("video", 25.0, SOURCE_FRAMES)
    assert (source["last_frame_held"], source["frames_past_end"]) == (False, 10 - SOURCE_FRAMES)  # one clip


def test_dub_from_https_to_s3_carries_the_new_speech(served: dict[str, Any]) -> None:
    result = served["dub"]
    assert (result["model"], result["adapter"]) == ("infinitetalk", "single")
    assert result["video"]["delivery"] == "s3" and result["video"]["key"] == "multitalk/dub.mp4"
    source = result["source"]
    assert (source["fps"], source["duration_s"], source["frames"]) == (25.0, 0.2, SOURCE_FRAMES)
    assert (source["frames_past_end"], source["frames_held"]) == (10 - SOURCE_FRAMES, 0)
    assert result["timings"]["adapter_swap_s"] > 0
    frames, audio_s = decoded(served["dub_bytes"], served["tmp"], "dub.mp4")
    assert frames.shape == (10, 48, 48, 3)
    assert abs(audio_s - 0.4) < 0.1  # the speech, trimmed to the video, is the soundtrack


def test_plan_says_from_which_frame_the_last_frame_is_held(volume: Path, tmp_path: Path) -> None:
    """Each clip is conditioned on the source frame at its start: the second clip starts past the 0.2 s
    source, so it and every frame after take the held last frame."""
    worker = JobService(settings_for(volume, tmp_path, MULTITALK_INFINITETALK_MAX_DURATION_S="10"))
    plan = output_of(run(worker, dub_job("inputs/source.mp4", max_duration_s=4.0, validate_only=True)))[
        "plan"
    ]
    source = plan["source"]
    assert plan["clips"] == 2 and source["last_frame_held"] is True
    start = source["last_frame_held_from"]
    assert SOURCE_FRAMES <= start < plan["frames"] and source["frames_held"] == plan["frames"] - start
    assert source["frames_past_end"] == plan["frames"] - SOURCE_FRAMES


def test_source_fps_and_color_reference_are_job_fields(volume: Path, tmp_path: Path) -> None:
    """The CLI's --source-fps and --color-reference as job fields: planned and reported; refused with an
    image, where they would change nothing."""
    worker = JobService(settings_for(volume, tmp_path))
    job = dub_job("inputs/source.mp4", source_fps="reference", color_reference="clip", validate_only=True)
    plan = output_of(run(worker, job))["plan"]
    assert plan["source"]["fps_mode"] == "reference" and plan["resolved"]["color_reference"] == "clip"
    default = output_of(run(worker, dub_job("inputs/source.mp4", validate_only=True)))["plan"]
    assert default["source"]["fps_mode"] == "resample" and default["resolved"]["color_reference"] == "first"
    refused = error_of(run(worker, image_job(source_fps="reference")))
    assert refused["code"] == "INVALID_INPUT" and "source_fps applies to a video source" in refused["message"]


def test_multitalk_after_infinitetalk_is_the_fresh_workers_video(served: dict[str, Any]) -> None:
    first, again = served["first"], served["again"]
    assert first["timings"]["adapter_swap_s"] == 0.0 and again["timings"]["adapter_swap_s"] > 0
    assert (again["model"], again["adapter"]) == ("multitalk", "multitalk")
    a, _ = decoded(base64_video(first), served["tmp"], "first.mp4")
    b, _ = decoded(base64_video(again), served["tmp"], "again.mp4")
    assert np.array_equal(a, b)


def test_health_lists_the_resident_adapters(served: dict[str, Any]) -> None:
    health = served["health"]
    assert [(a["model"], a["adapter"]) for a in health["adapters"]] == [
        ("multitalk", "multitalk"),
        ("infinitetalk", "single"),
        ("infinitetalk", "multi"),
    ]
    resident = health["pipeline"]["adapters"]
    assert resident["current"] == "multitalk" and resident["swaps"] == 2
    assert [r["tensors"] for r in resident["resident"]] == [26, 26, 26]


def test_swapped_in_adapter_makes_the_fresh_workers_dub(
    served: dict[str, Any], volume: Path, tmp_path: Path
) -> None:
    """A worker that loads InfiniteTalk's single adapter directly (no swap) makes the same video."""
    settings = settings_for(volume, tmp_path, MULTITALK_MODEL="infinitetalk", MULTITALK_ADAPTERS="single")
    job = dub_job("inputs/source.mp4", output={"delivery": "base64"})
    fresh = output_of(run(JobService(settings), job, "fresh"))
    assert fresh["timings"]["adapter_swap_s"] == 0.0
    a, _ = decoded(base64_video(fresh), tmp_path, "fresh.mp4")
    b, _ = decoded(served["dub_bytes"], tmp_path, "dub.mp4")
    assert np.array_equal(a, b)


def test_infinitetalk_image_with_two_speakers_uses_the_multi_adapter(volume: Path, tmp_path: Path) -> None:
    worker = JobService(settings_for(volume, tmp_path, MULTITALK_ADAPTERS="multi,single"))
    speakers = [{"audio": "inputs/speech_a.wav"}, {"audio": "inputs/speech_b.wav"}]
    job = image_job(model="infinitetalk", image="inputs/two_people.png", speakers=speakers)
    result = output_of(run(worker, job, "it-2"))
    assert (result["model"], result["adapter"], result["source"]["kind"]) == (
        "infinitetalk",
        "multi",
        "image",
    )
    frames, audio_s = decoded(base64_video(result), tmp_path, "two.mp4")
    assert frames.shape[0] == 10 and abs(audio_s - 0.4) < 0.1
    named = run(worker, job | {"adapter": "multitalk", "validate_only": True}, "wrong")
    assert "has no adapter 'multitalk'" in error_of(named)["message"]


def test_unserved_adapter_and_video_with_multitalk_are_refused(volume: Path, tmp_path: Path) -> None:
    worker = JobService(settings_for(volume, tmp_path, MULTITALK_ADAPTERS="multitalk"))
    unserved = error_of(run(worker, dub_job("inputs/source.mp4"), "unserved"))
    assert unserved["code"] == "INVALID_INPUT" and "does not serve infinitetalk/single" in unserved["message"]
    wrong = error_of(run(worker, dub_job("inputs/source.mp4", model="multitalk"), "mt-video"))
    assert wrong["code"] == "INVALID_INPUT" and "animates an image" in wrong["message"]
    both = error_of(run(worker, dub_job("inputs/source.mp4", image="inputs/person.png"), "both"))
    assert "exactly one of image" in both["message"]


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\x00\x00\x00\x14ftypqt  ", "mp4"),
        (b"\x1a\x45\xdf\xa3\x01\x00\x00\x00", "matroska"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi"),
        (b"\x00\x00\x01\xba\x44\x00", "mpeg-ps"),
        (b"G" + b"\x00" * 187 + b"G", "mpeg-ts"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"\x89PNG\r\n\x1a\n", None),
    ],
)
def test_sniff_video(head: bytes, name: str | None) -> None:
    assert sniff(head, "video") == name


def test_large_output_goes_to_s3_in_parts(s3_server: S3Server, volume: Path, tmp_path: Path) -> None:
    """boto3's managed upload splits a file above its 8 MiB threshold into parts (the ETag says how many)."""
    video = tmp_path / "big.mp4"
    video.write_bytes(np.random.default_rng(0).bytes(9 * 2**20))
    settings = settings_for(volume, tmp_path, **s3_server.env())
    delivered = deliver_s3(video, "big.mp4", settings, make_s3_client(settings))
    head = s3_server.client().head_object(Bucket=OUTPUT_BUCKET, Key="big.mp4")
    assert delivered["key"] == "big.mp4" and head["ContentLength"] == 9 * 2**20
    assert json.loads(head["ETag"]).endswith("-2")  # two parts of 8 MiB and 1 MiB


def test_model_rules_of_the_contract(make_settings: Callable[..., Settings]) -> None:
    from multitalk_worker.errors import DurationTooLong, InvalidInput
    from multitalk_worker.schema import JobLimits, parse_job_input

    def limits(**env: str) -> JobLimits:
        return JobLimits.from_settings(make_settings(MULTITALK_MAX_RESOLUTION="720p", **env))

    job = {"video": "inputs/v.mp4", "speakers": [{"audio": "a.wav"}], "prompt": "p", "max_duration_s": 300}
    parsed = parse_job_input(job, limits(MULTITALK_MODEL="infinitetalk"))
    assert parsed.model is None and parsed.adapter_name("infinitetalk") == "single"  # type: ignore[union-attr]
    two = job | {"speakers": [{"audio": "a.wav"}, {"audio": "b.wav"}]}
    parsed = parse_job_input(two | {"model": "infinitetalk"}, limits())
    assert parsed.adapter_name("multitalk") == "multi"  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="send model 'infinitetalk'"):
        parse_job_input(job, limits())  # the default model is multitalk
    with pytest.raises(DurationTooLong, match=r"limit of 120 s \(MULTITALK_INFINITETALK_MAX_DURATION_S\)"):
        parse_job_input(job | {"model": "infinitetalk"}, limits(MULTITALK_INFINITETALK_MAX_DURATION_S="120"))
    with pytest.raises(DurationTooLong, match="limit of 40 s"):
        parse_job_input(job | {"video": None, "image": "i.png", "max_duration_s": 41}, limits())
