"""Local HTTP API: the worker's job contract over plain HTTP, for a GPU box without RunPod.

    POST /generate   body: the job input of docs/api.md (same schema as RunPod's `input`); waits for the video
    GET  /health     the `health` report (200 when every check passes, else 503)

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.server --port 8000

One job runs at a time (the pipeline is resident and not shared); further requests wait. The same handler
also runs under the runpod SDK's own test server: `python -m multitalk_worker.worker --rp_serve_api`.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from multitalk_worker.config import SettingsError, settings_from_process
from multitalk_worker.errors import WorkerError
from multitalk_worker.startup import health_report
from multitalk_worker.worker import Worker, configure_logging

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


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="multitalk-worker", version=_version(worker))

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        try:
            body: Any = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            body = "<not JSON>"  # refused by the schema as INVALID_INPUT, like any other bad input
        job = {"id": uuid.uuid4().hex, "input": body}
        outcome = await run_in_threadpool(worker.run, job)
        if outcome.error is not None:
            return JSONResponse(
                {"error": outcome.error}, status_code=HTTP_STATUS.get(outcome.error["code"], 500)
            )
        return JSONResponse(outcome.output)

    @app.get("/health")
    async def health() -> JSONResponse:
        report = await run_in_threadpool(health_report, worker.settings, worker.holder)
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    return app


def _version(worker: Worker) -> str:
    from multitalk_worker.startup import worker_version

    info = worker_version(worker.settings)
    return f"{info['version']} ({info['revision']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitalk_worker.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_process()
    except SettingsError as exc:
        sys.stderr.write(f"multitalk-worker: bad setting: {exc}\n")
        return 2
    configure_logging(settings.log_level)
    import uvicorn

    worker = Worker(settings)
    try:
        worker.holder.load()  # fail before listening if the weights are missing
    except WorkerError as exc:
        sys.stderr.write(f"multitalk-worker: {exc.code}: {exc.message}\n")
        return 1
    uvicorn.run(create_app(worker), host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
