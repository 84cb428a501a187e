"""Local HTTP API: the worker's job contract over plain HTTP, for a GPU box without RunPod.

    POST /run              body {"input": <job input>}: queue a job, answer {"id", "status"} at once
    GET  /status/{id}      status, progress (stage, clip i/n, step s/S, percent, ETA), output or error
    POST /cancel/{id}      a queued job ends at once, a running one at its next denoising step
    GET  /jobs/{id}/video  the finished mp4, streamed from disk (HTTP range requests work)
    POST /runsync          body {"input": ...}: queue and wait (for short jobs; same answer as /status)
    POST /generate         body: the job input itself; waits, answers the output or {"error"} with its status
    GET  /health           the health report (200 when every check passes, else 503); no token needed
    GET  /status           the queue: running job, jobs waiting, capacity
    GET  /                 a page to try the model in a browser; /docs and /openapi.json: the schema

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.local_api --port 8000

One job runs at a time on the resident pipeline (jobs.py); at most MULTITALK_QUEUE_SIZE wait, one more is
refused with 429. Finished jobs and their files are kept MULTITALK_JOB_TTL_S seconds. The queue lives in this
process: a restart loses it. Guards (guard.py): the Host header must be allowed, job requests must be
JSON and same-origin, and beyond loopback a bearer token is needed. A job's body is read up to three inline
inputs at MULTITALK_MAX_INPUT_MB each (as base64) plus 1 MB, and refused with 413 INPUT_TOO_LARGE past that.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from multitalk_worker.config import Settings, SettingsError, settings_from_process
from multitalk_worker.errors import InputTooLarge, InvalidInput, WorkerError
from multitalk_worker.local_api.guard import RequestGuard, api_error
from multitalk_worker.local_api.jobs import JobQueue, JobRecord, QueueFull
from multitalk_worker.logs import configure_logging
from multitalk_worker.schema import parse_job_input, parse_json_body
from multitalk_worker.service import JobService
from multitalk_worker.startup import health_report, worker_version

HTTP_STATUS = {
    "INVALID_INPUT": 422,
    "AUDIO_DECODE_FAILED": 422,
    "IMAGE_DECODE_FAILED": 422,
    "VIDEO_DECODE_FAILED": 422,
    "DURATION_TOO_LONG": 422,
    "INPUT_TOO_LARGE": 413,
    "OUTPUT_TOO_LARGE": 413,
    "INPUT_FETCH_FAILED": 502,
    "UPLOAD_FAILED": 502,
    "MODEL_MISSING": 503,
    "MODEL_LOAD_FAILED": 503,
    "OUT_OF_MEMORY": 503,
    "CANCELLED": 409,
    "GENERATION_FAILED": 500,
    "OUTPUT_INVALID": 500,
}
HEALTH_MAX_AGE_S = (
    30.0  # the checks behind /health (imports, versions, media: ~5 s cold) are rerun this often
)
WEB_FILES = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}  # the page's files, served from the package
RUNSYNC_WAIT_S = 90.0  # as RunPod's /runsync: after this, answer the job's current status


# ----------------------------------------------------------------------------- health, cached


class HealthCache:
    """The last health report, refreshed in a thread when older than HEALTH_MAX_AGE_S, so that /health
    answers at once however busy the worker is (a liveness probe must not time out behind a job)."""

    def __init__(self, worker: JobService) -> None:
        self.worker = worker
        self._report: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()
        self._refreshing = False

    def refresh(self) -> dict[str, Any]:
        report = health_report(self.worker.settings, self.worker.holder)
        with self._lock:
            self._report, self._at, self._refreshing = report, time.monotonic(), False
        return report

    def refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self.refresh, name="multitalk-health", daemon=True).start()

    async def get(self) -> dict[str, Any]:
        with self._lock:
            report, age = self._report, time.monotonic() - self._at
        if report is None:
            return await run_in_threadpool(self.refresh)
        if age > HEALTH_MAX_AGE_S:
            self.refresh_in_background()
        holder = self.worker.holder
        live = {
            "loaded": holder.pipeline is not None,
            "load_s": holder.load_s,
            "jobs_served": holder.jobs_served,
        }
        return {**report, "pipeline": live, "checked_s_ago": round(age, 1)}


# ----------------------------------------------------------------------------- app


def create_app(worker: JobService, queue: JobQueue | None = None) -> FastAPI:
    jobs = queue or JobQueue.for_worker(worker)
    health = HealthCache(worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        health.refresh_in_background()
        yield
        await run_in_threadpool(jobs.stop)

    app = FastAPI(
        title="multitalk-worker",
        version=_version(worker),
        description="Talking-video jobs (MultiTalk) on this machine. docs/api.md has the contract.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestGuard, settings=worker.settings)
    app.add_exception_handler(_BadBody, _bad_body)  # type: ignore[arg-type]
    _add_job_routes(app, worker, jobs)
    _add_info_routes(app, worker, jobs, health)
    _add_page_routes(app)
    from multitalk_worker.local_api.openapi import install_openapi

    install_openapi(app)
    return app


def _add_job_routes(app: FastAPI, worker: JobService, jobs: JobQueue) -> None:
    body_limit = max_body_bytes(worker.settings)

    @app.post("/run", openapi_extra=_body("RunRequest"), summary="Queue a job; answers its id at once")
    async def run(request: Request) -> JSONResponse:
        record = _submit(jobs, worker, _job_input(await _json_body(request, body_limit)))
        if isinstance(record, JSONResponse):
            return record
        return JSONResponse({"id": record.id, "status": record.status})

    @app.post("/runsync", openapi_extra=_body("RunRequest"), summary="Queue a job and wait for it")
    async def runsync(request: Request) -> JSONResponse:
        record = _submit(jobs, worker, _job_input(await _json_body(request, body_limit)))
        if isinstance(record, JSONResponse):
            return record
        await _wait(jobs, record, RUNSYNC_WAIT_S)
        return JSONResponse(status_body(jobs, record))

    @app.post("/generate", openapi_extra=_body("GenerateInput"), summary="Run a job, answer its output")
    async def generate(request: Request) -> JSONResponse:
        record = _submit(jobs, worker, await _json_body(request, body_limit))
        if isinstance(record, JSONResponse):
            return record
        await _wait(jobs, record, None)
        body = status_body(jobs, record)
        if record.error is not None:
            return JSONResponse(
                {"error": record.error}, status_code=HTTP_STATUS.get(record.error["code"], 500)
            )
        return JSONResponse(body["output"])

    @app.get("/status/{job_id}", summary="A job's status, progress and result")
    async def status(job_id: str) -> JSONResponse:
        record = jobs.get(job_id)
        return JSONResponse(status_body(jobs, record)) if record is not None else _unknown(job_id)

    @app.post("/cancel/{job_id}", summary="Cancel a job (a running one stops at its next step)")
    async def cancel(job_id: str) -> JSONResponse:
        record = jobs.cancel(job_id)
        return JSONResponse(status_body(jobs, record)) if record is not None else _unknown(job_id)

    @app.get("/jobs/{job_id}/video", summary="The finished video (mp4)", response_class=FileResponse)
    async def video(job_id: str) -> Response:
        record = jobs.get(job_id)
        if record is None:
            return _unknown(job_id)
        if record.video is None or not record.video.is_file():
            detail = "has no video file (it was delivered elsewhere)" if record.finished else "is not done"
            return api_error("NOT_READY", f"job {job_id} {detail}; see GET /status/{job_id}")
        return FileResponse(record.video, media_type="video/mp4", filename=f"{job_id}.mp4")


def _add_info_routes(app: FastAPI, worker: JobService, jobs: JobQueue, health: HealthCache) -> None:
    @app.get("/health", summary="Startup checks, pipeline state and settings (secrets masked)")
    async def get_health() -> JSONResponse:
        report = {**await health.get(), "queue": jobs.counts()}
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/status", summary="The queue: running job, jobs waiting, capacity")
    async def queue_status() -> JSONResponse:
        return JSONResponse({"queue": jobs.counts(), "worker": worker_version(worker.settings)})


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in WEB_FILES:
            return api_error("NOT_FOUND", f"no file {name!r}; the page's files are {', '.join(WEB_FILES)}")
        return Response(_web_file(name), media_type=WEB_FILES[name])


def _web_file(name: str) -> str:
    return (resources.files("multitalk_worker.local_api") / "web" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- helpers


class _BadBody(Exception):
    def __init__(self, error: WorkerError) -> None:
        self.error = error


INLINE_INPUTS = 3  # a job's files that may come in its body: the image or video and two speech tracks
BODY_SLACK_BYTES = 1_000_000  # the prompt and every other field


def max_body_bytes(settings: Settings) -> int:
    """The largest request body read: every inline input at the per-file cap, as base64, plus the rest."""
    return INLINE_INPUTS * math.ceil(settings.max_input_bytes * 4 / 3) + BODY_SLACK_BYTES


async def _json_body(request: Request, limit: int) -> Any:
    """The parsed body, or a typed error: INPUT_TOO_LARGE past `limit` bytes (read no further than that),
    INVALID_INPUT when it is not JSON, not UTF-8 or nested too deeply (schema.parse_json_body)."""
    too_large = InputTooLarge(
        f"the request body is over {limit / 1e6:.1f} MB ({INLINE_INPUTS} inline inputs of at most "
        "MULTITALK_MAX_INPUT_MB each as base64, plus 1 MB); send the files as URLs or make them smaller"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BadBody(too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadBody(too_large)
        chunks.append(chunk)
    try:
        return parse_json_body(b"".join(chunks))  # the contract's one JSON reader (schema.py)
    except InvalidInput as exc:
        raise _BadBody(exc) from None


async def _bad_body(request: Request, exc: _BadBody) -> JSONResponse:
    return JSONResponse({"error": exc.error.to_dict()}, status_code=HTTP_STATUS[exc.error.code])


def _job_input(body: Any) -> Any:
    """The `input` of a RunPod-shaped body `{"input": {...}}`."""
    if not isinstance(body, dict) or set(body) != {"input"}:
        keys = ", ".join(sorted(body)) if isinstance(body, dict) else type(body).__name__
        raise _BadBody(InvalidInput(f'the body must be {{"input": {{...job...}}}} (got {keys}); see /docs'))
    return body["input"]


def _submit(jobs: JobQueue, worker: JobService, raw_input: Any) -> JobRecord | JSONResponse:
    """Check the input against the schema (no fetching), then queue it; a typed error response if not."""
    try:
        parse_job_input(raw_input, worker.limits)  # the worker's own limits: the same rules as every door
        return jobs.submit(raw_input)
    except WorkerError as exc:
        return JSONResponse({"error": exc.to_dict()}, status_code=HTTP_STATUS.get(exc.code, 500))
    except QueueFull as exc:
        return api_error("QUEUE_FULL", str(exc))


async def _wait(jobs: JobQueue, record: JobRecord, timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    jobs.on_finish(record, lambda: loop.call_soon_threadsafe(done.set))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        return


def status_body(jobs: JobQueue, record: JobRecord) -> dict[str, Any]:
    """What /status/{id} answers. A local video appears as its URL, never as a path on this machine."""
    expires = record.finished_at + jobs.ttl_s if record.finished_at is not None else None
    progress = record.tracker.snapshot()
    if record.status == "COMPLETED":
        progress = progress.finished()
    output = record.output
    if (
        output is not None
        and isinstance(output.get("video"), dict)
        and output["video"].get("delivery") == "local"
    ):
        output = {
            **output,
            "video": {"delivery": "local", "url": f"/jobs/{record.id}/video", "expires_at": expires},
        }
    body: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "position": jobs.position(record.id),
        "progress": progress.to_dict(),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "expires_at": expires,
    }
    if output is not None:
        body["output"] = output
    if record.error is not None:
        body["error"] = record.error
    return body


def _unknown(job_id: str) -> JSONResponse:
    return api_error("NOT_FOUND", f"no job {job_id!r} (never queued, or expired after MULTITALK_JOB_TTL_S)")


def _body(model: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _version(worker: JobService) -> str:
    info = worker_version(worker.settings)
    return f"{info['version']} ({info['revision']})"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multitalk_worker.local_api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_process()
    except SettingsError as exc:
        sys.stderr.write(f"multitalk-worker: bad setting: {exc}\n")
        return 2
    if not is_loopback(args.host) and not settings.api_token:
        sys.stderr.write(
            f"multitalk-worker: listening on {args.host} (beyond loopback) needs MULTITALK_API_TOKEN, "
            "and MULTITALK_ALLOWED_HOSTS naming the host clients use\n"
        )
        return 2
    configure_logging(settings.log_level)
    if settings.log_level != "DEBUG":  # one line per request: the page polls /status twice a second
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    import uvicorn

    from multitalk_worker.weights.download import ensure_weights

    worker = JobService(settings)
    try:
        ensure_weights(settings)
        worker.holder.load()  # fail before listening if the weights are missing
    except WorkerError as exc:
        sys.stderr.write(f"multitalk-worker: {exc.code}: {exc.message}\n")
        return 1
    uvicorn.run(
        create_app(worker),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        log_config=None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
