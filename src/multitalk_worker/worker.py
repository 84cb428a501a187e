"""The RunPod handler: validate, fetch, generate, encode, verify, deliver. The one place where exceptions
become error payloads.

`Worker.run(job)` serves one job and never raises: it returns a `JobOutcome` holding either the result or a
typed error (code, message, stage, retryable) plus whether RunPod should refresh the worker (after an
out-of-memory or CUDA fault). The pipeline loads once and stays resident. `make_handler` adapts a Worker to
the runpod SDK (async, so a RunPod cancel reaches the pipeline's cancel check); `main` starts it:

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.worker --test_input "$(cat examples/tiny_job.json)"
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import av
import torch

from multitalk_worker.config import Settings, SettingsError, settings_from_process
from multitalk_worker.errors import (
    DurationTooLong,
    GenerationFailed,
    InputTooLarge,
    InvalidInput,
    OutOfMemory,
    OutputInvalid,
    WorkerError,
)
from multitalk_worker.logs import quiet_model_libraries
from multitalk_worker.media import Mp4Sink, probe_mp4
from multitalk_worker.pipeline.image import image_size
from multitalk_worker.pipeline.inputs import PreparedInputs, prepare_inputs
from multitalk_worker.pipeline.presets import PRESETS, apply_preset
from multitalk_worker.pipeline.request import (
    CheckedInputs,
    GenerationRequest,
    GenerationResult,
    Progress,
    SamplingParams,
    Speaker,
)
from multitalk_worker.pipeline.video import VideoInfo
from multitalk_worker.pipeline.video import probe_video as probe_source
from multitalk_worker.redact import RedactingStream
from multitalk_worker.schema import GenerateInput, HealthInput, parse_job_input, parse_source
from multitalk_worker.startup import PipelineHolder, health_report, register_fitness_checks, worker_version
from multitalk_worker.storage import (
    InputFetcher,
    check_s3_destination,
    deliver_base64,
    deliver_s3,
    deliver_volume,
    volume_destination,
)
from multitalk_worker.timeline import FPS

logger = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]  # (job, update)
INPUT_STAGES = ("validate", "fetch")  # before the model: what goes wrong here comes from the job's inputs
UpdateHook = Callable[[dict[str, Any]], None]  # one job's updates: pipeline progress and the worker's stages
RANDOM_SEED = -1  # the pipeline draws a seed and reports it
AUDIO_TOLERANCE_S = (
    0.1  # AAC frames are 64 ms at 16 kHz; the soundtrack may end within one of the video's end
)


@dataclass
class JobOutcome:
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    refresh_worker: bool = False

    def to_runpod(self) -> dict[str, Any]:
        """The runpod SDK's form: an `error` string fails the job; `refresh_worker` restarts the worker."""
        if self.error is None:
            return dict(self.output or {})
        out: dict[str, Any] = {"error": json.dumps(self.error)}
        if self.refresh_worker:
            out["refresh_worker"] = True
        return out


@dataclass
class _Fetched:
    image: Path | None
    audio: list[Path]
    report: dict[str, Any] = field(default_factory=dict)
    video: Path | None = None
    video_info: VideoInfo | None = None


class _Stage:
    """Where the job is, so an unexpected exception is reported with the right stage; each new stage is
    also reported to the job's update hook (the local API's progress)."""

    def __init__(self, hook: UpdateHook | None = None) -> None:
        self._hook = hook
        self._name = "validate"

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        if self._hook is not None:
            self._hook({"stage": value, "chunk": 0, "chunks": 0, "step": 0, "steps": 0})


class Worker:
    def __init__(
        self,
        settings: Settings,
        progress_sink: ProgressSink | None = None,
        holder: PipelineHolder | None = None,
    ) -> None:
        """`holder`: the pipeline's source (under torchrun: parallel_worker.py's); default: one process."""
        self.settings = settings
        self.fetcher = InputFetcher(settings)
        self.holder = holder or PipelineHolder(settings)
        self.progress_sink = progress_sink
        self._lock = threading.Lock()
        if settings.work_dir is not None:
            settings.work_dir.mkdir(parents=True, exist_ok=True)

    def run(
        self,
        job: dict[str, Any],
        cancel: threading.Event | None = None,
        *,
        local_video: Path | None = None,
        on_update: UpdateHook | None = None,
    ) -> JobOutcome:
        """Serve one job. Never raises an Exception; the worker serves the next job whatever happened.

        The local HTTP API passes `local_video` (delivery `auto` without an S3 bucket then moves the mp4
        there: `{"delivery": "local", "path"}`) and `on_update` (progress and stage updates of this job)."""
        job_id = _safe_id(job.get("id"))
        stage = _Stage(on_update)
        start = time.monotonic()
        try:
            with self._lock:
                output = self._run(job, job_id, cancel or threading.Event(), stage, local_video, on_update)
            logger.info("job %s done in %.2f s", job_id, time.monotonic() - start)
            return JobOutcome(output=output)
        except Exception as exc:  # the edge: every exception becomes a typed payload
            return self._failure(exc, job_id, stage.name)

    # -- the job

    def _run(
        self,
        job: dict[str, Any],
        job_id: str,
        cancel: threading.Event,
        stage: _Stage,
        local_video: Path | None,
        on_update: UpdateHook | None,
    ) -> dict[str, Any]:
        settings = self.settings
        parsed = parse_job_input(
            job.get("input"),
            tiny_model=settings.tiny_model,
            max_resolution=settings.max_resolution,
            max_duration_s=settings.max_duration_s,
            default_model=settings.default_model,
            infinitetalk_max_duration_s=settings.infinitetalk_max_duration_s,
        )
        if isinstance(parsed, HealthInput):
            return health_report(settings, self.holder)
        delivery = self._resolve_delivery(parsed, job_id, local_video)
        timings: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix=f"multitalk-{job_id}-", dir=settings.work_dir) as scratch:
            stage.name = "fetch"
            tick = time.monotonic()
            fetched = self._fetch_inputs(parsed, Path(scratch))
            timings["fetch_s"] = time.monotonic() - tick
            stage.name = "validate"
            request = self._build_request(parsed, fetched)
            # the CLI's checks, bounded; the pipeline takes what they decoded (nothing is decoded twice)
            inputs = prepare_inputs(request, tiny_model=settings.tiny_model)
            sink = Mp4Sink(Path(scratch) / f"{job_id}.mp4", crf=settings.video_crf)  # encoded clip by clip
            try:
                checked = inputs.checked()
                duration_s = self._check_duration(parsed, checked)
                plan = _plan(parsed, request, fetched, checked, duration_s, delivery)
                plan.update(source_plan(inputs, fetched.video_info))
                if parsed.validate_only:
                    from multitalk_worker.preview import plan_details

                    plan |= plan_details(request, settings, with_image=True, inputs=inputs)
                    return {"validate_only": True, "plan": plan, "worker": worker_version(settings)}
                stage.name = "load"
                pipeline, load_s, cold = self.holder.get()
                timings.update(model_load_s=load_s, cold_start=cold)
                timings["adapter_swap_s"] = self.holder.use(request.model, request.adapter or "")
                stage.name = "generate"
                progress = self._progress(job, on_update)
                result = pipeline(request, progress=progress, cancel=cancel.is_set, sink=sink, inputs=inputs)
                stage.name = "encode"
                sink.close()
            except BaseException:
                sink.abort()
                raise
            finally:
                inputs.close()
            timings.update({f"{k}_s" if not k.endswith("_s") else k: v for k, v in result.timings.items()})
            timings["encode_s"] = sink.encode_s
            return self._finish(result, sink.path, plan, delivery, timings, stage)

    def _finish(
        self,
        result: GenerationResult,
        video: Path,
        plan: dict[str, Any],
        delivery: dict[str, Any],
        timings: dict[str, Any],
        stage: _Stage,
    ) -> dict[str, Any]:
        stage.name = "verify"
        tick = time.monotonic()
        info = verify_video(video, result)
        digest, size = _sha256(video), video.stat().st_size
        timings["verify_s"] = time.monotonic() - tick
        stage.name = "output"
        tick = time.monotonic()
        delivered = self._deliver(video, delivery)
        timings["deliver_s"] = time.monotonic() - tick
        return {
            "video": delivered,
            "sha256": digest,
            "bytes": size,
            "duration_s": info.duration_s,
            "audio_duration_s": info.audio_duration_s,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "frames": info.frames,
            "seed": result.seed,
            "model": result.resolved["model"],
            "adapter": result.resolved["adapter"],
            "source": {**plan["source"], **result.resolved["source"]},  # type: ignore[dict-item]
            "resolved": {**plan["resolved"], **result.resolved, "seed": result.seed},
            "timings": timings,
            "worker": worker_version(self.settings),
        }

    # -- steps

    def _resolve_delivery(
        self, parsed: GenerateInput, job_id: str, local_video: Path | None
    ) -> dict[str, Any]:
        settings, wanted = self.settings, parsed.output
        method = wanted.delivery
        if method == "auto":
            method = "s3" if settings.s3.bucket else "local" if local_video is not None else "base64"
        if method == "local":
            return {"delivery": "local", "path": str(local_video)}
        if method == "s3":
            if not settings.s3.bucket:
                raise InvalidInput(
                    "delivery s3 needs MULTITALK_S3_BUCKET on the worker; use base64 or volume"
                )
            check_s3_destination(settings, self.fetcher.s3_client())  # before any work
            return {"delivery": "s3", "key": settings.s3.prefix + (wanted.key or f"{job_id}.mp4")}
        if wanted.key is not None:
            raise InvalidInput(
                "output.key applies to delivery s3, but this worker has no MULTITALK_S3_BUCKET"
            )
        if method == "volume":
            if not settings.volume_root.is_dir():
                raise InvalidInput(f"delivery volume needs the volume root {settings.volume_root} to exist")
            path = wanted.path or f"{settings.output_dir}/{job_id}.mp4"
            volume_destination(path, settings)  # writable, or refused now rather than after generation
            return {"delivery": "volume", "path": path}
        return {"delivery": "base64"}

    def _fetch_inputs(self, parsed: GenerateInput, scratch: Path) -> _Fetched:
        if parsed.video is not None:
            video, info, report = self._fetch_video(parsed, scratch)
            image_path = None
        else:
            assert parsed.image is not None  # the schema: exactly one of image and video
            image = self.fetcher.fetch(parse_source(parsed.image), scratch / "image", "image", "image")
            # the header only (a huge image is refused undecoded); the size as shown
            width, height = image_size(image.path, parsed.image_orientation)
            report = {"image": {"width": width, "height": height, "bytes": image.size}}
            video, info, image_path = None, None, image.path
        audio_paths = []
        for index, speaker in enumerate(parsed.speakers):
            label = f"speakers[{index}].audio"
            fetched = self.fetcher.fetch(
                parse_source(speaker.audio), scratch / f"audio{index}", "audio", label
            )
            if parsed.max_duration_s is None:  # with a cap, long audio is fine: its first part is used
                self._check_declared_duration(fetched.path, label, self._limit_s(parsed))
            audio_paths.append(fetched.path)
        return _Fetched(image_path, audio_paths, report, video, info)

    def _fetch_video(self, parsed: GenerateInput, scratch: Path) -> tuple[Path, VideoInfo, dict[str, Any]]:
        """Fetch the source video (size-capped, time-limited, magic bytes), then decode its first frame and
        check its length as it decodes against the model's cap, before any GPU work."""
        assert parsed.video is not None
        fetched = self.fetcher.fetch(parse_source(parsed.video), scratch / "video", "video", "video")
        limit = self._limit_s(parsed)
        # VIDEO_DECODE_FAILED: no video stream, no decodable frame; the length is what decodes
        info = probe_source(fetched.path, max_seconds=limit)
        if info.duration_s > limit + 1.0 / FPS:
            least = "" if info.complete else "at least "
            raise DurationTooLong(
                f"video lasts {least}{info.duration_s:.1f} s; this worker dubs videos of at most {limit:g} s "
                "(MULTITALK_INFINITETALK_MAX_DURATION_S); send a shorter cut"
            )
        report = {
            "video": {
                "width": info.width,
                "height": info.height,
                "bytes": fetched.size,
                "fps": info.source_fps,
                "frames": info.source_frames,
                "duration_s": info.duration_s,
                "codec": info.codec,
            }
        }
        return fetched.path, info, report

    def _limit_s(self, parsed: GenerateInput) -> float:
        """The longest video this worker makes for the job's model, in seconds."""
        return self.settings.max_duration_for(parsed.model_name(self.settings.default_model))

    def _check_declared_duration(self, path: Path, label: str, limit: float) -> None:
        """Refuse audio whose container declares it too long before decoding all of it into memory."""
        declared = declared_duration_s(path)
        if declared is not None and declared > limit + 1.0:
            raise DurationTooLong(
                f"{label} lasts {declared:.1f} s; this worker makes videos of at most {limit:g} s. "
                f"Set max_duration_s (<= {limit:g}) to use the first part, or send shorter audio"
            )

    def _check_duration(self, parsed: GenerateInput, checked: CheckedInputs) -> float:
        """The worker's own limit for the job's model on uncapped jobs; returns the video's length."""
        audio_s, limit = checked.audio_s, self._limit_s(parsed)
        if parsed.max_duration_s is None and audio_s > limit:
            raise DurationTooLong(
                f"the audio lasts {audio_s:.1f} s; this worker makes videos of at most {limit:g} s. "
                f"Set max_duration_s (<= {limit:g}) to use the first part, or send shorter audio"
            )
        return min(audio_s, parsed.max_duration_s or audio_s)

    def _build_request(self, parsed: GenerateInput, fetched: _Fetched) -> GenerationRequest:
        default_model = self.settings.default_model
        return GenerationRequest(
            model=parsed.model_name(default_model),  # type: ignore[arg-type]
            adapter=parsed.adapter_name(default_model),
            image=fetched.image,
            video=fetched.video,
            speakers=tuple(
                Speaker(path, _region(s.region))
                for path, s in zip(fetched.audio, parsed.speakers, strict=True)
            ),
            prompt=parsed.prompt,
            audio_mode=parsed.audio_mode,
            negative_prompt=parsed.negative_prompt,
            resolution=parsed.resolution,
            max_duration_s=parsed.max_duration_s,
            sampling=resolve_sampling(parsed),
            source_fps=parsed.source_fps or "resample",
            color_reference=parsed.color_reference or "first",
            image_orientation=parsed.image_orientation,
            image_background=parsed.image_background,
        )

    def _deliver(self, video: Path, delivery: dict[str, Any]) -> dict[str, object]:
        if delivery["delivery"] == "s3":
            return deliver_s3(video, delivery["key"], self.settings, self.fetcher.s3_client())
        if delivery["delivery"] == "volume":
            return deliver_volume(video, delivery["path"], self.settings)
        if delivery["delivery"] == "local":  # the local API's own folder; it serves the file itself
            shutil.move(video, delivery["path"])
            return {"delivery": "local", "path": delivery["path"]}
        return deliver_base64(video, self.settings)

    def _progress(self, job: dict[str, Any], on_update: UpdateHook | None) -> Callable[[Progress], None]:
        job_id = _safe_id(job.get("id"))
        start = time.monotonic()

        def report(progress: Progress) -> None:
            update: dict[str, Any] = {
                "stage": progress.stage,
                "chunk": progress.chunk,
                "chunks": progress.chunks,
                "step": progress.step,
                "steps": progress.steps,
                **progress_eta(progress, time.monotonic() - start),
            }
            logger.debug("job %s progress %s", job_id, update)
            if self.progress_sink is not None:
                self.progress_sink(job, update)
            if on_update is not None:
                on_update(update)

        return report

    # -- failures

    def _failure(self, exc: Exception, job_id: str, stage: str) -> JobOutcome:
        error, refresh = error_for(exc, stage)
        if isinstance(exc, WorkerError):
            logger.warning("job %s failed: %s at %s: %s", job_id, error.code, error.stage, error.message)
        else:
            logger.error("job %s failed: %s at %s", job_id, error.code, stage, exc_info=exc)
        if refresh:
            self.holder.release_gpu_memory()
            logger.error("job %s: asking RunPod to refresh this worker after %s", job_id, error.code)
        return JobOutcome(error=error.to_dict(), refresh_worker=refresh)


def error_for(exc: Exception, stage: str) -> tuple[WorkerError, bool]:
    """Map any exception to one typed error, and whether the worker must be refreshed (GPU state suspect)."""
    if isinstance(exc, WorkerError):
        return exc, isinstance(exc, OutOfMemory)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        message = f"GPU out of memory during {stage}; try a lower resolution, a shorter video or a bigger GPU"
        return OutOfMemory(message, stage=stage), True
    if isinstance(exc, MemoryError) and stage in INPUT_STAGES:  # the inputs' own cost: a retry fails again
        message = f"the inputs need more host memory than this worker has (during {stage}); send smaller ones"
        return InputTooLarge(message, stage=stage), False
    if isinstance(exc, MemoryError):
        return OutOfMemory(f"host memory exhausted during {stage}", stage=stage), True
    if isinstance(exc, RuntimeError) and ("CUDA" in str(exc) or "cuDNN" in str(exc) or "NCCL" in str(exc)):
        return GenerationFailed(f"CUDA fault during {stage}; the worker will be replaced", stage=stage), True
    return GenerationFailed(
        f"internal error ({type(exc).__name__}) during {stage}; see the worker log", stage=stage
    ), False


def progress_eta(progress: Progress, elapsed_s: float) -> dict[str, float | None]:
    """The share of denoising steps done over all clips, and the time left at the rate so far (None until
    a step is done)."""
    total = progress.chunks * progress.steps
    done = max(progress.chunk - 1, 0) * progress.steps + progress.step if total else 0
    fraction = done / total if total else 0.0
    eta = elapsed_s * (1 - fraction) / fraction if fraction > 0 else None
    return {"percent": round(100 * fraction, 1), "eta_s": None if eta is None else round(eta, 1)}


def resolve_sampling(parsed: GenerateInput) -> SamplingParams:
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
    sampling = apply_preset(parsed.preset, parsed.resolution, base)
    overrides = {
        name: getattr(adv, name)
        for name in ("steps", "text_guidance", "audio_guidance", "shift")
        if getattr(adv, name) is not None
    }
    return replace(sampling, **overrides)


def verify_video(path: Path, result: GenerationResult) -> Any:
    """Decode our own mp4 and check frame count, size, fps, duration and soundtrack against what we meant."""
    info = probe_mp4(path)
    count, (height, width) = result.frame_count, result.size
    expected_s = count / result.fps
    problems = []
    if info.frames != count:
        problems.append(f"{info.frames} frames decoded, {count} written")
    if (info.width, info.height) != (width, height):
        problems.append(f"size {info.width}x{info.height}, expected {width}x{height}")
    if abs(info.fps - result.fps) > 1e-3:
        problems.append(f"{info.fps:g} fps, expected {result.fps}")
    if abs(info.duration_s - expected_s) > 1e-6:
        problems.append(f"duration {info.duration_s:.3f} s, expected {expected_s:.3f} s")
    wants_audio = result.audio.size > 0
    if wants_audio and not info.has_audio:
        problems.append("no audio stream")
    if wants_audio and info.has_audio and abs(info.audio_duration_s - expected_s) > AUDIO_TOLERANCE_S:
        problems.append(f"audio lasts {info.audio_duration_s:.3f} s, video {expected_s:.3f} s")
    if problems:
        raise OutputInvalid("the encoded video failed its check: " + "; ".join(problems), stage="verify")
    return info


def _plan(
    parsed: GenerateInput,
    request: GenerationRequest,
    fetched: _Fetched,
    checked: CheckedInputs,
    duration_s: float,
    delivery: dict[str, Any],
) -> dict[str, Any]:
    picture = fetched.report.get("image") or fetched.report["video"]
    sampling = request.sampling
    return {
        "image" if "image" in fetched.report else "video": picture,
        "bucket": list(checked.bucket),
        "audio_durations_s": list(checked.track_s),
        "audio_cut": checked.audio_cut,
        "duration_s": duration_s,
        "frames": checked.frames,
        "delivery": delivery,
        "resolved": {
            "model": request.model,
            "adapter": request.adapter,
            "preset": parsed.preset,
            "preset_needs_lora": PRESETS[parsed.preset].needs_lora,
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


def source_plan(inputs: PreparedInputs, video: VideoInfo | None) -> dict[str, Any]:
    """The clip plan and, for a video source, its frame rate and whether its last frame will be held.

    The output follows the speech; each clip is conditioned on the source frame at its start (spec IT 5),
    so a clip starting past the source's end takes its last frame, held: `last_frame_held_from` is that
    clip's start and `frames_held` the output frames from there on (what the result's `source` reports
    after the run). `frames_past_end`: output frames after the source's last frame."""
    plan = inputs.plan
    out: dict[str, Any] = {"clips": len(plan.starts), "frames": plan.output_frames}
    if video is None:
        out["source"] = inputs.source_report()  # kind, mode, orientation, background
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


def declared_duration_s(path: Path) -> float | None:
    """The duration a media container declares (no decoding); None when it declares none or cannot be read."""
    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is not None and stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
    except (av.FFmpegError, OSError, ValueError):
        return None  # the decode that follows reports the problem as AUDIO_DECODE_FAILED
    return None


def _region(region: object) -> Any:
    return tuple(region) if isinstance(region, list) else region


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_id(raw: object) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw or "job"))[:64]
    return text or "job"


# ----------------------------------------------------------------------------- runpod adapter


def make_handler(worker: Worker) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """An async runpod handler: the job runs in a thread; a RunPod cancel sets the pipeline's cancel flag."""

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(worker.run, job, cancel))
        try:
            outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            logger.info("job %s cancelled by RunPod; stopping at the next step", _safe_id(job.get("id")))
            await asyncio.wait({task})
            raise
        return outcome.to_runpod()

    return handler


def runpod_progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    """Send one progress update to RunPod's queue (visible in /status while the job runs)."""
    import runpod

    runpod.serverless.progress_update(job, update)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Our loggers at `level`, each line with its level and logger name; boto/urllib3 at WARNING at least
    (their DEBUG logs carry signed headers); transformers/diffusers at ERROR unless DEBUG (their load
    reports); the runpod SDK at INFO at least (at DEBUG it prints every job's input and output, payloads
    included). `force`: importing the runpod SDK installs a root handler without level or name
    (runpod/serverless/utils/rp_upload.py), which would make a plain basicConfig do nothing."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("multitalk_worker").setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_model_libraries(verbose=level == "DEBUG")
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().level = {"DEBUG": "INFO", "WARNING": "WARN"}.get(level, level)


def main() -> None:
    try:
        settings = settings_from_process()
    except SettingsError as exc:
        sys.stderr.write(f"multitalk-worker: bad setting: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    if settings.world_size > 1:  # under torchrun: every process shares each job (docs/multi-gpu.md)
        from multitalk_worker.distributed import end_process
        from multitalk_worker.parallel_worker import run_parallel

        end_process(run_parallel(settings, serve))
    serve(settings)


def serve(settings: Settings, holder: PipelineHolder | None = None) -> None:
    """Run the runpod SDK's worker loop with a Worker (its `--test_input` mode exits when done)."""
    import runpod

    worker = Worker(settings, progress_sink=runpod_progress if settings.on_runpod else None, holder=holder)
    if settings.on_runpod:
        register_fitness_checks(settings, worker.holder)
    else:  # local mode: the SDK prints each job's result at INFO, presigned URLs included
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
    logger.info("multitalk-worker %s starting (weights: %s)", worker_version(settings), settings.weights)
    from multitalk_worker.weights.download import ensure_weights

    ensure_weights(settings)  # MULTITALK_FETCH_WEIGHTS; a failure stops the worker before it takes a job
    runpod.serverless.start({"handler": make_handler(worker)})


if __name__ == "__main__":
    main()
