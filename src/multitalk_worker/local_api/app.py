"""Local HTTP API: the worker's job contract over plain HTTP, for a GPU box without RunPod.

    POST /run              body {"input": <job>, "policy"?, "webhook"?}: queue a job, answer {"id", "status"}
    GET  /status/{id}      status, progress (stage, clip i/n, step s/S, percent, ETA), output or error
    GET  /stream/{id}      the progress updates not read yet: {"status", "stream": [{"output": update}, ...]}
    POST /cancel/{id}      a queued job ends at once, a running one at its next denoising step
    POST /purge-queue      every waiting job ends CANCELLED: {"removed", "status": "completed"}
    GET  /jobs/{id}/video  the finished mp4, streamed from disk (HTTP range requests work)
    POST /runsync          as /run, then waits (90 s, or ?wait=<ms>) and answers as /status
    POST /generate         body: the job input itself; waits, answers the output or {"error"} with its status
    GET  /health           the health report and RunPod's job counts (200 when every check passes, else 503)
    GET  /status           the queue: running job, jobs waiting, capacity
    GET  /                 a page to try the model in a browser; /docs and /openapi.json: the schema

RunPod's operations (run, runsync, status, stream, cancel, purge-queue, health) answer under an endpoint id
too, `/{endpoint_id}/run` and so on, as RunPod serves them: the runpod SDK's `Endpoint` works against this
server with `runpod.endpoint_url_base = "http://127.0.0.1:8000"` (any endpoint id). Statuses are RunPod's
(IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT); a failed job's `error` is a JSON string
as on RunPod; `policy` (executionTimeout, ttl) is enforced by the queue (jobs.py) and `webhook` receives the
final status (local_api/webhook.py).

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
import dataclasses
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from multitalk_worker.config import Settings, SettingsError, settings_from_process
from multitalk_worker.errors import InputTooLarge, InvalidInput, WorkerError
from multitalk_worker.local_api.envelope import JobRequest, Policy, parse_request
from multitalk_worker.local_api.guard import RequestGuard, api_error
from multitalk_worker.local_api.jobs import JobQueue, JobRecord, QueueFull
from multitalk_worker.local_api.part import PartSoFar
from multitalk_worker.local_api.webhook import check_webhook, post_status_in_background
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
    "TIMED_OUT": 504,
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
RUNSYNC_WAIT_MS = (1_000, 300_000)  # RunPod's bounds of /runsync?wait=<ms>
WORKER_ID = "local"  # RunPod's status names the worker that ran the job; here there is one


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
        self._first = threading.Event()  # set once the first report exists

    def refresh(self) -> dict[str, Any]:
        try:
            report = health_report(self.worker.settings, self.worker.holder)
            with self._lock:
                self._report, self._at = report, time.monotonic()
            return report
        finally:
            with self._lock:
                self._refreshing = False
            self._first.set()

    def refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self.refresh, name="multitalk-health", daemon=True).start()

    async def get(self) -> dict[str, Any]:
        with self._lock:
            report, age = self._report, time.monotonic() - self._at
        if report is None:  # the first report: wait for the one being made at start, not a second one
            self.refresh_in_background()
            await run_in_threadpool(self._first.wait)
            with self._lock:
                report, age = self._report, time.monotonic() - self._at
            if report is None:  # that refresh failed: make one here, its error answered as a 500
                report, age = await run_in_threadpool(self.refresh), 0.0
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
    app.add_exception_handler(_BadBody, _bad_body)
    app.add_exception_handler(HTTPException, _http_error)
    _add_job_routes(app, worker, jobs)
    _add_info_routes(app, worker, jobs)
    _add_page_routes(app)
    operations = _runpod_operations(worker, jobs, health)
    app.include_router(operations)
    # RunPod's paths, `/{endpoint_id}/<operation>`: the same routes (any endpoint id), not listed twice
    app.include_router(operations, prefix="/{endpoint_id}", include_in_schema=False)
    from multitalk_worker.local_api.openapi import install_openapi

    install_openapi(app)
    return app


def _runpod_operations(worker: JobService, jobs: JobQueue, health: HealthCache) -> APIRouter:
    """RunPod's queue operations; the app serves them at the root and under `/{endpoint_id}`."""
    router = APIRouter()
    body_limit = max_body_bytes(worker.settings)

    @router.post("/run", openapi_extra=_body("RunRequest"), summary="Queue a job; answers its id at once")
    async def run(request: Request) -> JSONResponse:
        record = await run_in_threadpool(
            _submit, jobs, worker, _job_request(await _json_body(request, body_limit))
        )
        if isinstance(record, JSONResponse):
            return record
        return JSONResponse({"id": record.id, "status": "IN_QUEUE"})  # as queued (it may have started since)

    @router.post("/runsync", openapi_extra=_body("RunRequest"), summary="Queue a job and wait for it")
    async def runsync(request: Request, wait: int | None = None) -> JSONResponse:
        if wait is not None and not RUNSYNC_WAIT_MS[0] <= wait <= RUNSYNC_WAIT_MS[1]:
            raise _BadBody(
                InvalidInput(f"wait: {wait} ms is outside {RUNSYNC_WAIT_MS[0]}-{RUNSYNC_WAIT_MS[1]}")
            )
        record = await run_in_threadpool(
            _submit, jobs, worker, _job_request(await _json_body(request, body_limit))
        )
        if isinstance(record, JSONResponse):
            return record
        await _wait(jobs, record, RUNSYNC_WAIT_S if wait is None else wait / 1000)
        return JSONResponse(status_body(jobs, record))

    @router.get("/status/{job_id}", summary="A job's status, progress and result")
    async def status(job_id: str) -> JSONResponse:
        record = jobs.get(job_id)
        return JSONResponse(status_body(jobs, record)) if record is not None else _unknown(job_id)

    @router.get("/stream/{job_id}", summary="The job's progress updates not read yet")
    async def stream(job_id: str) -> JSONResponse:
        record = jobs.get(job_id)
        if record is None:
            return _unknown(job_id)
        updates = [{"output": update} for update in jobs.take_stream(record)]
        return JSONResponse({"id": record.id, "status": record.status, "stream": updates})

    @router.post("/cancel/{job_id}", summary="Cancel a job (a running one stops at its next step)")
    async def cancel(job_id: str) -> JSONResponse:
        record = jobs.cancel(job_id)
        return JSONResponse(status_body(jobs, record)) if record is not None else _unknown(job_id)

    @router.post("/purge-queue", summary="Cancel every waiting job (the running one goes on)")
    async def purge_queue() -> JSONResponse:
        return JSONResponse({"removed": jobs.purge(), "status": "completed"})

    @router.get("/health", summary="Startup checks, pipeline state, settings (secrets masked), job counts")
    async def get_health() -> JSONResponse:
        report = {**await health.get(), "queue": jobs.counts(), **runpod_counts(jobs)}
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    return router


def _add_job_routes(app: FastAPI, worker: JobService, jobs: JobQueue) -> None:
    body_limit = max_body_bytes(worker.settings)

    @app.post("/generate", openapi_extra=_body("GenerateInput"), summary="Run a job, answer its output")
    async def generate(request: Request) -> JSONResponse:
        raw = await _json_body(request, body_limit)
        record = await run_in_threadpool(
            _submit, jobs, worker, JobRequest(input=raw, policy=Policy(), webhook=None)
        )
        if isinstance(record, JSONResponse):
            return record
        await _wait(jobs, record, None)
        body = status_body(jobs, record)
        if record.error is not None:
            return JSONResponse(
                {"error": record.error}, status_code=HTTP_STATUS.get(record.error["code"], 500)
            )
        return JSONResponse(body["output"])

    parts = PartSoFar(worker.settings, jobs.results)

    @app.get(
        "/jobs/{job_id}/video",
        summary="The finished video (mp4); while the job runs, the part so far",
        response_class=FileResponse,
    )
    async def video(job_id: str) -> Response:
        record = jobs.get(job_id)
        if record is None:
            return _unknown(job_id)
        if record.status == "IN_PROGRESS":
            part = await run_in_threadpool(parts.video, job_id)
            if part is not None:
                return FileResponse(part, media_type="video/mp4", headers={"Cache-Control": "no-store"})
        if record.video is None or not record.video.is_file():
            detail = "has no video file (it was delivered elsewhere)" if record.finished else "is not done"
            return api_error("NOT_READY", f"job {job_id} {detail}; see GET /status/{job_id}")
        return FileResponse(record.video, media_type="video/mp4", filename=f"{job_id}.mp4")


def _add_info_routes(app: FastAPI, worker: JobService, jobs: JobQueue) -> None:
    @app.get("/status", summary="The queue: running job, jobs waiting, capacity")
    async def queue_status() -> JSONResponse:
        return JSONResponse({"queue": jobs.counts(), "worker": worker_version(worker.settings)})


def runpod_counts(jobs: JobQueue) -> dict[str, Any]:
    """RunPod's /health counts: jobs by state since start, and this one worker, idle or running."""
    totals = jobs.totals()
    return {
        "jobs": {
            "completed": totals["COMPLETED"],
            "failed": totals["FAILED"] + totals["TIMED_OUT"],
            "inProgress": totals["IN_PROGRESS"],
            "inQueue": totals["IN_QUEUE"],
            "retried": 0,
        },
        "workers": {"idle": 1 - totals["IN_PROGRESS"], "running": totals["IN_PROGRESS"]},
    }


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


async def _bad_body(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, _BadBody)  # registered for _BadBody only
    return JSONResponse({"error": exc.error.to_dict()}, status_code=HTTP_STATUS[exc.error.code])


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take) in the API's error shape."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    if exc.status_code == 405:
        return api_error(
            "METHOD_NOT_ALLOWED", f"{request.method} is not served at {request.url.path}; see /docs"
        )
    return api_error("NOT_FOUND", f"no route {request.method} {request.url.path}; see /docs for the routes")


def _job_request(body: Any) -> JobRequest:
    """The job request of a RunPod-shaped body `{"input": {...}, "policy"?, "webhook"?}`."""
    try:
        return parse_request(body)
    except InvalidInput as exc:
        raise _BadBody(exc) from None


def _submit(jobs: JobQueue, worker: JobService, request: JobRequest) -> JobRecord | JSONResponse:
    """Check the input against the schema (no fetching), then queue it; a typed error response if not. A
    webhook gets the job's final status."""
    settings = worker.settings
    try:
        parse_job_input(request.input, worker.limits)  # the worker's own limits: the same rules as every door
        if request.webhook is not None:
            check_webhook(request.webhook, settings)
        record = jobs.submit(
            request.input, execution_timeout_s=request.execution_timeout_s, ttl_s=request.ttl_s
        )
    except WorkerError as exc:
        return JSONResponse({"error": exc.to_dict()}, status_code=HTTP_STATUS.get(exc.code, 500))
    except QueueFull as exc:
        return api_error("QUEUE_FULL", str(exc))
    webhook = request.webhook
    if webhook is not None:
        jobs.on_finish(
            record, lambda: post_status_in_background(webhook, status_body(jobs, record), settings)
        )
    return record


async def _wait(jobs: JobQueue, record: JobRecord, timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    jobs.on_finish(record, lambda: loop.call_soon_threadsafe(done.set))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        return


def status_body(jobs: JobQueue, record: JobRecord) -> dict[str, Any]:
    """What /status/{id} answers: RunPod's status (`id`, `status`, `delayTime` and `executionTime` in ms,
    `workerId`, `output` (the latest progress while running, as RunPod shows a worker's progress updates) or
    `error` (a JSON string, as RunPod carries a worker's error) and ours (`position`, `progress`, the times).
    A local video appears as its URL, never as a path on this machine."""
    expires = record.finished_at + jobs.ttl_s if record.finished_at is not None else None
    progress = record.progress
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
        "delayTime": _ms(record.created_at, record.started_at or record.finished_at),
        "executionTime": _ms(record.started_at, record.finished_at),
        "workerId": WORKER_ID,
        "position": jobs.position(record.id),
        "progress": progress.to_dict(),
        "clips_done": record.progress.clips_done,
        "ready_s": record.progress.ready_s,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "expires_at": expires,
    }
    if output is not None:
        body["output"] = output
    elif record.status == "IN_PROGRESS":
        body["output"] = body["progress"]
    if record.error is not None:
        body["error"] = json.dumps(record.error)
    return body


def _ms(start: float | None, end: float | None) -> int | None:
    """Milliseconds from `start` to `end` (to now while `end` is None); None before `start`."""
    if start is None:
        return None
    return round(((end if end is not None else time.time()) - start) * 1000)


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


def with_data_dir(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """The served API's settings: its data folder (MULTITALK_API_DATA_DIR, else the per-user
    `$XDG_DATA_HOME/multitalk-worker`), and its checkpoints under it when MULTITALK_CHECKPOINT_DIR is unset,
    so that a restarted server finds the running job's checkpoint."""
    home = Path(environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    data = settings.api_data_dir or home / "multitalk-worker"
    checkpoints = settings.checkpoint_dir or data / "checkpoints"
    return dataclasses.replace(settings, api_data_dir=data, checkpoint_dir=checkpoints)


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
        settings = with_data_dir(settings_from_process(), os.environ)
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
