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
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import av
from av.error import FFmpegError

from multitalk_worker.config import Settings
from multitalk_worker.errors import WorkerError
from multitalk_worker.io.delivery import Delivery, choose_delivery, part_delivery
from multitalk_worker.io.fetch import InputFetcher
from multitalk_worker.pipeline.checkpoint import ClipCheckpoint
from multitalk_worker.pipeline.image import image_size
from multitalk_worker.pipeline.inputs import PreparedInputs
from multitalk_worker.pipeline.request import CheckedInputs, GenerationRequest, GenerationResult
from multitalk_worker.pipeline.video import VideoInfo
from multitalk_worker.pipeline.video import probe_video as probe_source
from multitalk_worker.progress import Progress, ProgressTracker, Snapshot
from multitalk_worker.registry import pipeline_class
from multitalk_worker.schema import GenerateInput, HealthInput, JobLimits, parse_job_input
from multitalk_worker.segments import ClipSegments
from multitalk_worker.service.checkpoints import open_checkpoint
from multitalk_worker.service.faults import error_for
from multitalk_worker.service.part import PartPublisher
from multitalk_worker.service.report import job_result, plan_report
from multitalk_worker.service.request import build_request
from multitalk_worker.service.resident import PipelineHolder
from multitalk_worker.service.verify import sha256, verify_video
from multitalk_worker.startup import health_report, worker_version
from multitalk_worker.timeline import FPS

logger = logging.getLogger(__name__)

# (job, snapshot) after each of the pipeline's events: RunPod's progress updates (worker.py)
ProgressSink = Callable[[dict[str, Any], Snapshot], None]
# one job's snapshots after every event: the pipeline's and the service's own stages (the local API)
UpdateHook = Callable[[Snapshot], None]


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
    an event of the job's progress tracker, whose snapshot goes to the job's update hook."""

    def __init__(self, hook: UpdateHook | None = None) -> None:
        self._hook = hook
        self._name = "validate"
        self.tracker = ProgressTracker()  # the job's one tracker: its stages and the pipeline's events
        self.sink: Callable[[], ClipSegments] | None = None  # once the clips have one: what is finished

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        snapshot = self.tracker.update(Progress(value))
        if self._hook is not None:
            self._hook(self.with_ready(snapshot))

    def clips(self) -> ClipSegments:
        assert self.sink is not None, "the clip loop's sink is set before its first event"
        return self.sink()

    def with_ready(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with what the job's sink holds finished (once the clip loop has one)."""
        if self.sink is None:
            return snapshot
        sink = self.sink()
        fps = sink.spec.fps if sink.spec is not None else 0
        seconds = sink.frames_written / fps if fps else 0.0
        return replace(snapshot, clips_done=len(sink.frame_counts), ready_s=round(seconds, 3))


class JobService:
    def __init__(
        self,
        settings: Settings,
        progress_sink: ProgressSink | None = None,
        holder: PipelineHolder | None = None,
    ) -> None:
        """`holder`: the pipeline's source (under torchrun: parallel_worker.py's); default: one process."""
        self.settings = settings
        self.limits = JobLimits.from_settings(settings)  # what every door's jobs are parsed against
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
        parsed = parse_job_input(job.get("input"), self.limits)
        if isinstance(parsed, HealthInput):
            return health_report(settings, self.holder)
        delivery = choose_delivery(
            parsed.output.delivery,
            key=parsed.output.key,
            path=parsed.output.path,
            job_id=job_id,
            settings=settings,
            local_video=local_video,
            s3_client=self.fetcher.s3_client,
        )
        delivery.check()  # a destination that cannot take the video refuses the job before any work
        timings: dict[str, Any] = {}
        part = part_delivery(delivery, settings)  # S3: the part so far beside the video, as it grows
        publisher: PartPublisher | None = None
        with tempfile.TemporaryDirectory(prefix=f"multitalk-{job_id}-", dir=settings.work_dir) as scratch:
            stage.name = "fetch"
            tick = time.monotonic()
            fetched = self._fetch_inputs(parsed, Path(scratch))
            timings["fetch_s"] = time.monotonic() - tick
            stage.name = "validate"
            request = self._build_request(parsed, fetched)
            # the CLI's checks, bounded; the pipeline takes what they decoded (nothing is decoded twice)
            # the model's pipeline class (registry entry) decodes and checks its inputs
            inputs = pipeline_class(request.model).prepare_inputs(request, tiny_model=settings.tiny_sizes)
            try:
                duration_s = self._check_duration(parsed, inputs.checked())
                plan = plan_report(parsed, request, inputs, fetched.report, duration_s, delivery.plan)
                if parsed.validate_only:
                    from multitalk_worker.preview import plan_details

                    if isinstance(inputs, PreparedInputs):  # the Wan models' preview (crop, masks)
                        plan |= plan_details(request, settings, with_image=True, inputs=inputs)
                    return {"validate_only": True, "plan": plan, "worker": worker_version(settings)}
                stage.name = "load"
                pipeline, load_s, cold = self.holder.get()
                # each clip is encoded as it is final: into the job's checkpoint (resumable after a lost
                # worker) where the resident pipeline resumes, else into scratch segments
                checkpoint = open_checkpoint(settings, job_id, request) if pipeline.resumable else None
                segments = ClipSegments(Path(scratch) / "segments", settings.video_crf)
                timings.update(model_load_s=load_s, cold_start=cold)
                timings["adapter_swap_s"] = self.holder.use(request.model, request.adapter or "")
                stage.name = "generate"
                stage.sink = lambda: checkpoint.sink if checkpoint is not None else segments
                if part is not None:
                    publisher = PartPublisher(part, lambda: stage.clips().folder, Path(scratch))
                progress = self._progress(job, stage, on_update, publisher)
                result = pipeline(
                    request,
                    progress=progress,
                    cancel=cancel.is_set,
                    sink=segments,
                    inputs=inputs,
                    checkpoint=checkpoint,
                )
            finally:
                inputs.close()
                if publisher is not None:  # an upload under way ends before the video is delivered
                    publisher.close()
                    timings["part_s"] = publisher.seconds
            stage.name = "encode"
            sink = checkpoint.sink if checkpoint is not None else segments
            video = Path(scratch) / f"{job_id}.mp4"
            sink.assemble(video)
            timings.update({f"{k}_s" if not k.endswith("_s") else k: v for k, v in result.timings.items()})
            timings["encode_s"] = sink.encode_s
            if checkpoint is not None:
                timings["checkpoint_save_s"] = checkpoint.save_s
            output = self._finish(parsed, result, video, delivery, timings, stage, checkpoint)
            if checkpoint is not None:  # delivered: nothing is left to resume
                checkpoint.remove()
            if part is not None:  # a resumed job's part may be an earlier worker's: removed all the same
                part.remove_part()
            return output

    def _finish(
        self,
        parsed: GenerateInput,
        result: GenerationResult,
        video: Path,
        delivery: Delivery,
        timings: dict[str, Any],
        stage: _Stage,
        checkpoint: ClipCheckpoint | None,
    ) -> dict[str, Any]:
        stage.name = "verify"
        tick = time.monotonic()
        info = verify_video(video, result)
        digest = sha256(video)
        timings["verify_s"] = time.monotonic() - tick
        stage.name = "output"
        tick = time.monotonic()
        size = video.stat().st_size
        delivered = delivery.deliver(video)  # the file may move: its size is taken first
        timings["deliver_s"] = time.monotonic() - tick
        output = job_result(
            parsed,
            result,
            info,
            size,
            digest=digest,
            delivered=delivered,
            timings=timings,
            worker=worker_version(self.settings),
            checkpoint_bytes=checkpoint.saved_bytes if checkpoint is not None else 0,
        )
        return output.model_dump()

    # -- steps

    def _fetch_inputs(self, parsed: GenerateInput, scratch: Path) -> _Fetched:
        if parsed.video is not None:
            video, info, report = self._fetch_video(parsed, scratch)
            image_path = None
        else:
            assert parsed.image is not None  # the schema: exactly one of image and video
            image = self.fetcher.fetch(parsed.source("image"), scratch / "image", "image", "image")
            # the header only (a huge image is refused undecoded); the size as shown
            width, height = image_size(image.path, parsed.image_orientation)
            report = {"image": {"width": width, "height": height, "bytes": image.size}}
            video, info, image_path = None, None, image.path
        audio_paths = []
        for index in range(len(parsed.speakers)):
            label = f"speakers[{index}].audio"
            fetched = self.fetcher.fetch(parsed.source(label), scratch / f"audio{index}", "audio", label)
            # the declared length (an estimate for some mp3s: 1 s slack), before decoding any of it
            self.limits.check_length(
                parsed, media_s=declared_duration_s(fetched.path), what=label, slack_s=1.0
            )
            audio_paths.append(fetched.path)
        return _Fetched(image_path, audio_paths, report, video, info)

    def _fetch_video(self, parsed: GenerateInput, scratch: Path) -> tuple[Path, VideoInfo, dict[str, Any]]:
        """Fetch the source video (size-capped, time-limited, magic bytes), then decode its first frame and
        check its length as it decodes against the model's cap, before any GPU work."""
        assert parsed.video is not None
        fetched = self.fetcher.fetch(parsed.source("video"), scratch / "video", "video", "video")
        # VIDEO_DECODE_FAILED: no video stream, no decodable frame; the length is what decodes, counted
        # up to just past the model's limit (a longer source is refused without decoding all of it)
        limit_s = self.limits.duration_s[self.limits.model(parsed)]
        info = probe_source(fetched.path, max_seconds=limit_s)
        # a source video must fit whatever length the job asks for
        self.limits.check_length(
            parsed,
            media_s=info.duration_s,
            complete=info.complete,
            what="video",
            slack_s=1.0 / FPS,
            requested=False,
            remedy="Send a shorter cut",
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

    def _check_duration(self, parsed: GenerateInput, checked: CheckedInputs) -> float:
        """The decoded length against the job's limit; returns the video's length."""
        self.limits.check_length(parsed, media_s=checked.audio_s)
        return min(checked.audio_s, parsed.max_duration_s or checked.audio_s)

    def _build_request(self, parsed: GenerateInput, fetched: _Fetched) -> GenerationRequest:
        return build_request(
            parsed,
            default_model=self.settings.default_model,
            image=fetched.image,
            video=fetched.video,
            audio=fetched.audio,
        )

    def _progress(
        self,
        job: dict[str, Any],
        stage: _Stage,
        on_update: UpdateHook | None,
        publisher: PartPublisher | None,
    ) -> Callable[[Progress], None]:
        """The pipeline's progress callback: each event through the job's tracker, the snapshot (with what is
        finished: `clips_done` and `ready_s`; with S3 delivery the part so far's `part_url`, `publisher`) to
        RunPod's progress updates (`progress_sink`) and to the door's hook."""
        job_id = safe_id(job.get("id"))

        def report(event: Progress) -> None:
            snapshot = stage.with_ready(stage.tracker.update(event))
            if publisher is not None:
                publisher.offer(snapshot.clips_done)
                snapshot = publisher.annotate(snapshot)
            logger.debug("job %s progress %s", job_id, snapshot)
            if self.progress_sink is not None:
                self.progress_sink(job, snapshot)
            if on_update is not None:
                on_update(snapshot)

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


def declared_duration_s(path: Path) -> float | None:
    """The duration a media container declares (no decoding); None when it declares none or cannot be read."""
    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is not None and stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
    except (FFmpegError, OSError, ValueError):
        return None  # the decode that follows reports the problem as AUDIO_DECODE_FAILED
    return None


def safe_id(raw: object) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw or "job"))[:64]
    return text or "job"
