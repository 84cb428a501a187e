"""The job service: validate, fetch, generate, encode, verify, deliver. No RunPod and no HTTP here: the
doors (worker.py for RunPod, local_api/ for HTTP, cli.py) hand it a job and read its outcome.

`JobService.run(job)` serves one job and never raises: it returns a `JobOutcome` holding either the result
or a typed error (code, message, stage, retryable) plus whether the worker should be refreshed (after an
out-of-memory or CUDA fault; service/faults.py). The pipeline loads once and stays resident
(service/resident.py).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from multitalk_worker.config import Settings
from multitalk_worker.errors import DurationTooLong, InvalidInput, WorkerError
from multitalk_worker.io.delivery import deliver_base64, deliver_s3, deliver_volume
from multitalk_worker.io.fetch import InputFetcher
from multitalk_worker.io.s3 import check_s3_destination
from multitalk_worker.io.volume import volume_destination
from multitalk_worker.media import Mp4Sink
from multitalk_worker.pipeline.image import image_size
from multitalk_worker.pipeline.inputs import PreparedInputs
from multitalk_worker.pipeline.request import CheckedInputs, GenerationRequest, GenerationResult, Progress
from multitalk_worker.pipeline.video import VideoInfo
from multitalk_worker.pipeline.video import probe_video as probe_source
from multitalk_worker.registry import pipeline_class
from multitalk_worker.schema import GenerateInput, HealthInput, parse_job_input, parse_source
from multitalk_worker.service.faults import error_for
from multitalk_worker.service.report import plan_report, source_plan
from multitalk_worker.service.request import build_request
from multitalk_worker.service.resident import PipelineHolder
from multitalk_worker.service.verify import sha256, verify_video
from multitalk_worker.startup import health_report, worker_version
from multitalk_worker.timeline import FPS

logger = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]  # (job, update)
UpdateHook = Callable[[dict[str, Any]], None]  # one job's updates: pipeline progress and the worker's stages


@dataclass
class JobOutcome:
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    refresh_worker: bool = False


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


class JobService:
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
        job_id = safe_id(job.get("id"))
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
            # the model's pipeline class (registry entry) decodes and checks its inputs
            inputs = pipeline_class(request.model).prepare_inputs(request, tiny_model=settings.tiny_model)
            sink = Mp4Sink(Path(scratch) / f"{job_id}.mp4", crf=settings.video_crf)  # encoded clip by clip
            try:
                checked = inputs.checked()
                duration_s = self._check_duration(parsed, checked)
                plan = plan_report(parsed, request, fetched.report, checked, duration_s, delivery)
                plan.update(source_plan(inputs, fetched.video_info))
                if parsed.validate_only:
                    from multitalk_worker.preview import plan_details

                    if isinstance(inputs, PreparedInputs):  # the Wan models' preview (crop, masks, clips)
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
        digest, size = sha256(video), video.stat().st_size
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
            width, height = image_size(image.path)  # the header only: a huge image is refused undecoded
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
        check its declared length against the model's cap, before any GPU work."""
        assert parsed.video is not None
        fetched = self.fetcher.fetch(parse_source(parsed.video), scratch / "video", "video", "video")
        info = probe_source(fetched.path)  # VIDEO_DECODE_FAILED: no video stream, no decodable frame
        limit = self._limit_s(parsed)
        if info.duration_s > limit + 1.0 / FPS:
            raise DurationTooLong(
                f"video lasts {info.duration_s:.1f} s; this worker dubs videos of at most {limit:g} s "
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
        return build_request(
            parsed,
            default_model=self.settings.default_model,
            image=fetched.image,
            video=fetched.video,
            audio=fetched.audio,
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
        job_id = safe_id(job.get("id"))
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


def progress_eta(progress: Progress, elapsed_s: float) -> dict[str, float | None]:
    """The share of denoising steps done over all clips, and the time left at the rate so far (None until
    a step is done)."""
    total = progress.chunks * progress.steps
    done = max(progress.chunk - 1, 0) * progress.steps + progress.step if total else 0
    fraction = done / total if total else 0.0
    eta = elapsed_s * (1 - fraction) / fraction if fraction > 0 else None
    return {"percent": round(100 * fraction, 1), "eta_s": None if eta is None else round(eta, 1)}


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


def safe_id(raw: object) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw or "job"))[:64]
    return text or "job"
