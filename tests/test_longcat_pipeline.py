"""LongCat-Video-Avatar end to end on the built-in tiny models (CPU): one speaker from an image, two speakers
with regions (1.0, guided), a continuation of a video, a long generation of 3 segments, the CLI door, and
bad inputs with their typed errors. Few steps; every segment is the model's 93 frames (its window), so each
test decodes as few segments as it can."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from multitalk_worker.config import Settings
from multitalk_worker.errors import Cancelled, InvalidInput, ModelLoadFailed, ModelMissing
from multitalk_worker.media import probe_mp4
from multitalk_worker.models.runtime import AUTO, FAST_RUNTIME, REFERENCE_RUNTIME
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint
from multitalk_worker.pipeline.engine import EngineOptions, LoraSpec, engine_options
from multitalk_worker.pipeline.longcat import LongCatPipeline
from multitalk_worker.pipeline.longcat_segments import ADVANCE, SEGMENT_FRAMES
from multitalk_worker.pipeline.request import (
    GenerationRequest,
    Progress,
    SamplingParams,
    Speaker,
    VideoSpec,
)
from multitalk_worker.registry import get_model, pipeline_class
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES
from tests.test_server import run as submit
from tests.test_server import serve, wait_until  # noqa: F401 - serve: the local API fixture

ONE_STEP = SamplingParams(steps=1, text_guidance=1.0, audio_guidance=1.0, seed=3)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny convolutions, one thread


@pytest.fixture(scope="module")
def v15() -> LongCatPipeline:
    return LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar")


@pytest.fixture(scope="module")
def v10() -> LongCatPipeline:
    return LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar-1.0")


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """speech_a then speech_b: 7.58 s, 189 frames at 25 fps (3 segments)."""
    a, rate = sf.read(EXAMPLES / "speech_a.wav", dtype="float32")
    b, _ = sf.read(EXAMPLES / "speech_b.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, np.concatenate([a, b]), rate)
    return path


class Recorder:
    """A FrameSink that keeps what it is given, chunk by chunk."""

    def __init__(self) -> None:
        self.spec: VideoSpec | None = None
        self.chunks: list[np.ndarray] = []

    def open(self, spec: VideoSpec) -> None:
        self.spec = spec

    def write(self, frames: np.ndarray) -> None:
        self.chunks.append(frames)


def request(model: str = "longcat-avatar", **changes: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "speakers": (Speaker(EXAMPLES / "speech_a.wav"),),
        "prompt": "a person talks",
        "model": model,
        "image": EXAMPLES / "person.png",
        "resolution": "tiny",
        "max_duration_s": 1.0,
        "sampling": ONE_STEP,
    }
    return GenerationRequest(**(fields | changes))  # type: ignore[arg-type]


def test_one_speaker_from_an_image_is_trimmed_to_the_audio(v15: LongCatPipeline) -> None:
    events: list[Progress] = []
    sink = Recorder()
    result = v15(request(sampling=SamplingParams(seed=3, steps=8, text_guidance=1.0, audio_guidance=1.0)),
                 sink=sink, progress=events.append)  # fmt: skip
    assert result.frames is None and result.fps == 25 and result.frame_count == 25  # 1 s at 25 fps
    assert sink.spec is not None and sink.spec.fps == 25 and sink.spec.frames == 25
    assert sink.spec.audio.shape[0] == 16_000  # the soundtrack follows the video
    (frames,) = sink.chunks
    assert frames.shape == (25, *result.size, 3) and frames.dtype == np.uint8
    assert frames.std() > 1.0  # a real decode, not a constant
    assert result.resolved["schedule"] == "distill" and result.resolved["passes_per_step"] == 1
    assert [e.step for e in events if e.stage == "sample"] == list(range(1, 9))


def test_long_generation_carries_segments(v15: LongCatPipeline, long_speech: Path) -> None:
    sink = Recorder()
    events: list[Progress] = []
    result = v15(request(speakers=(Speaker(long_speech),), max_duration_s=None), sink=sink,
                 progress=events.append)  # fmt: skip
    frames = int(7.5764375 * 25)
    assert result.resolved["segments"] == 3 and result.frame_count == frames
    assert [c.shape[0] for c in sink.chunks] == [SEGMENT_FRAMES, ADVANCE, frames - SEGMENT_FRAMES - ADVANCE]
    assert {e.chunks for e in events} == {3}
    assert not np.array_equal(sink.chunks[1], sink.chunks[0][-ADVANCE:])  # new frames, not a copy


def test_two_speakers_with_regions_guided_v10(v10: LongCatPipeline) -> None:
    speakers = (
        Speaker(EXAMPLES / "speech_a.wav", region=(0.0, 0.0, 0.5, 1.0)),
        Speaker(EXAMPLES / "speech_b.wav", region=(0.5, 0.0, 1.0, 1.0)),
    )
    guided = SamplingParams(steps=1, text_guidance=2.0, audio_guidance=3.0, seed=3)
    result = v10(request("longcat-avatar-1.0", speakers=speakers, image=EXAMPLES / "two_people.png",
                         sampling=guided))  # fmt: skip
    assert result.fps == 16 and result.frame_count == 16
    assert result.frames is not None and result.frames.shape[0] == 16
    assert result.resolved["passes_per_step"] == 3 and result.resolved["persons"] == 2


def test_continuation_of_a_video(v15: LongCatPipeline) -> None:
    result = v15(request(image=None, video=EXAMPLES / "source.mp4"))
    assert result.frame_count == 25 and result.resolved["source"] == {"kind": "video"}
    assert result.frames is not None and result.frames.shape[0] == 25 - 13  # the video's 13 frames dropped


def test_cancel_between_segments(v15: LongCatPipeline, long_speech: Path) -> None:
    asked = iter([False, True])
    with pytest.raises(Cancelled, match="segment 2"):
        v15(request(speakers=(Speaker(long_speech),), max_duration_s=4.0), cancel=lambda: next(asked))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapter": "single"}, "no audio adapters"),
        ({"prompt": " "}, "prompt is empty"),
        ({"image": None}, "exactly one of image and video"),
        ({"model": "longcat-avatar-1.0"}, "serves model longcat-avatar"),
        ({"segment_length": "most"}, "segment length 'most' is not known"),
    ],
)
def test_bad_inputs_are_typed(v15: LongCatPipeline, changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        v15(request(**changes))


def test_vocal_separation_required_without_its_model(v15: LongCatPipeline) -> None:
    """The tiny model has no vocal_separator/: unset or false runs on the audio as sent; true is refused."""
    with pytest.raises(ModelMissing, match="vocal_separator/Kim_Vocal_2.onnx"):
        v15(request(vocal_separation=True))


def test_cli_door(cli, tmp_path: Path) -> None:  # noqa: ANN001 - conftest's fixture
    out = tmp_path / "out.mp4"
    proc = cli(
        "generate", "--model", "longcat-avatar", "--weights", "tiny", "--device", "cpu",
        "--image", EXAMPLES / "person.png", "--audio", EXAMPLES / "speech_b.wav", "--prompt", "hello",
        "--max-duration", "0.6", "--steps", "1", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = probe_mp4(out)
    assert (info.frames, info.fps, info.has_audio) == (15, 25.0, True)
    assert "model longcat-avatar," in proc.stdout
    assert pipeline_class("longcat-avatar") is LongCatPipeline


def test_worker_door(make_settings: Callable[..., Settings]) -> None:
    """A job through the RunPod handler (the SDK's run_job, in-process) on a worker serving longcat-avatar:
    validate_only's plan, then the video; a job for another model is refused with its typed error."""
    from tests.test_worker import job_input, run

    service = JobService(make_settings(MULTITALK_MODEL="longcat-avatar"))
    job = job_input(model="longcat-avatar", max_duration_s=0.6, advanced={"steps": 1, "seed": 3},
                    output={"delivery": "base64"})  # fmt: skip
    plan = run(service, job | {"validate_only": True})["output"]["plan"]
    assert (plan["clips"], plan["frames"], plan["resolved"]["fps"], plan["resolved"]["segments"]) == (
        1,
        15,
        25,
        1,
    )
    assert plan["resolved"]["preset"] == "longcat-distill" and plan["resolved"]["adapter"] is None
    output = run(service, job)["output"]
    assert (output["frames"], output["fps"], output["model"], output["adapter"]) == (
        15,
        25,
        "longcat-avatar",
        None,
    )
    assert output["resolved"]["segments"] == 1 and output["video"]["delivery"] == "base64"
    error = json.loads(run(service, job | {"model": "multitalk"})["error"])
    assert error["code"] == "INVALID_INPUT" and "serves model longcat-avatar" in error["message"]
    error = json.loads(run(service, job | {"adapter": "single"})["error"])
    assert error["code"] == "INVALID_INPUT" and "no adapter" in error["message"]


def test_local_api_door(serve: Callable[..., str]) -> None:  # noqa: F811
    """The local API serving longcat-avatar: /health lists it (the page's model list), a job runs to an mp4
    on the loopback server."""
    import requests

    api = serve(MULTITALK_MODEL="longcat-avatar")
    models = requests.get(f"{api}/health", timeout=60).json()["models"]
    assert models == [{"model": "longcat-avatar", "sources": ["image", "video"], "adapters": [], "fps": 25,
                       "presets": ["longcat-distill", "longcat-1.5"], "default_preset": "longcat-distill",
                       "default": True}]  # fmt: skip
    job = {"image": "inputs/person.png", "speakers": [{"audio": "inputs/speech_b.wav"}], "prompt": "hi",
           "model": "longcat-avatar", "resolution": "tiny", "max_duration_s": 0.6,
           "advanced": {"steps": 1, "seed": 3}}  # fmt: skip
    body = wait_until(api, submit(api, job), lambda b: b["status"] in ("COMPLETED", "FAILED"))
    assert body["status"] == "COMPLETED", body
    assert (body["output"]["frames"], body["output"]["fps"]) == (15, 25)


def test_the_engine_reaches_the_dit(v15: LongCatPipeline) -> None:
    """The fast engine's runtime (its attention kernels and fused paths; compilation is left out here: it
    costs seconds of CPU per shape) runs every DiT call: the same frames as the reference path within float32
    rounding. A kernel that cannot run here, and what LongCat does not support yet, are refused at load."""
    fast = EngineOptions(runtime=FAST_RUNTIME, attention=AUTO)
    pipeline = LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar", engine=fast)
    runtime = pipeline.engine.runtime
    assert runtime.attention_backend == "sdpa" and runtime != REFERENCE_RUNTIME
    ours, reference = Recorder(), Recorder()
    pipeline(request(), sink=ours)
    v15(request(), sink=reference)
    difference = np.abs(np.concatenate(ours.chunks).astype(int) - np.concatenate(reference.chunks))
    assert difference.max() <= 1
    flash3 = engine_options("reference", attention="flash3")
    with pytest.raises(ModelLoadFailed, match="flash3"):
        LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar", engine=flash3)
    extra_lora = engine_options("reference", loras=(LoraSpec(EXAMPLES / "none.safetensors"),))
    with pytest.raises(InvalidInput, match="extra LoRAs"):
        LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar", engine=extra_lora)
    with pytest.raises(InvalidInput, match="no audio adapters"):
        LongCatPipeline.from_pretrained("tiny", device="cpu", model="longcat-avatar", adapter="single")


@pytest.mark.parametrize("model", ["longcat-avatar", "longcat-avatar-1.0"])
def test_a_resumed_job_makes_the_same_video(
    model: str, v15: LongCatPipeline, v10: LongCatPipeline, long_speech: Path, tmp_path: Path
) -> None:
    """Stopped once its first segment is on disk and run again, a job continues at segment 2 and its video
    has the bytes of a run that never stopped (2 segments: 4 s at 1.5's 25 fps, 7 s at 1.0's 16 fps; a drawn
    seed survives; 1.0 carries its last latents too)."""
    pipeline, seconds = (v15, 4.0) if model == "longcat-avatar" else (v10, 7.0)
    speech = (Speaker(long_speech),)
    job = request(model, speakers=speech, max_duration_s=seconds, sampling=replace(ONE_STEP, seed=-1))
    stopped = ClipCheckpoint(tmp_path / "job", "digest")
    with pytest.raises(Cancelled):
        pipeline(job, checkpoint=stopped, cancel=lambda: len(stopped.sink.paths()) >= 1)
    again = ClipCheckpoint(tmp_path / "job", "digest")
    resumed = pipeline(job, checkpoint=again)
    assert (resumed.clips_resumed, resumed.clips_generated) == (1, 1)
    assert resumed.resume_reason == "resumed after clip 1"
    again.sink.assemble(tmp_path / "resumed.mp4")
    whole = ClipCheckpoint(tmp_path / "whole", "digest")
    uninterrupted = pipeline(replace(job, sampling=replace(ONE_STEP, seed=resumed.seed)), checkpoint=whole)
    assert (uninterrupted.clips_resumed, uninterrupted.clips_generated) == (0, 2)
    whole.sink.assemble(tmp_path / "whole.mp4")
    assert (tmp_path / "resumed.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()


def test_batched_guidance_is_the_same_video(v15: LongCatPipeline) -> None:
    """`batched_guidance` (the reference's one-speaker [u_t, c] batch, used by tools/parity.py) and the
    default one-pass-at-a-time guidance give the same frames within the batched GEMMs' rounding."""
    guided = request(sampling=SamplingParams(seed=5, steps=1, text_guidance=4.0, audio_guidance=3.0))
    batched = LongCatPipeline(v15.bundle, v15.device, batched_guidance=True)
    one, two = v15(guided).frames, batched(guided).frames
    assert one is not None and two is not None and one.shape == two.shape
    assert np.abs(one.astype(np.int16) - two.astype(np.int16)).max() <= 1


def test_two_speakers_default_to_the_multi_scripts_negative_prompt() -> None:
    """The multi script's negative prompt writes "bright" in lower case (spec §5): another token sequence."""
    for model in ("longcat-avatar", "longcat-avatar-1.0"):
        family = get_model(model).family
        assert family is not None
        one, two = family.default_negative(1), family.default_negative(2)
        assert one.startswith("Close-up, Bright tones") and two == one.replace("Bright", "bright", 1)


@pytest.mark.parametrize("model", ["longcat-avatar", "longcat-avatar-1.0"])
def test_the_low_memory_mode_makes_the_same_video(
    model: str, v15: LongCatPipeline, v10: LongCatPipeline
) -> None:
    """MULTITALK_OFFLOAD: the DiT's and umT5's blocks live in host memory and visit the device one at a time
    (models/offload.py; on the CPU the copies are plain): the resident pipeline's frames, bit for bit, and
    every block back in host memory but the prefetched first."""
    low_memory = engine_options("reference", offload=True)
    pipeline = LongCatPipeline.from_pretrained("tiny", device="cpu", model=model, engine=low_memory)
    dit, text = pipeline.offloads
    assert len(dit.blocks) == len(pipeline.bundle.dit.blocks) and text.host_bytes() > 0
    resident = v15 if model == "longcat-avatar" else v10
    ours, reference = Recorder(), Recorder()
    pipeline(request(model), sink=ours)
    resident(request(model), sink=reference)
    np.testing.assert_array_equal(np.concatenate(ours.chunks), np.concatenate(reference.chunks))
    assert dit.resident() == [0] and text.resident() == [0]
