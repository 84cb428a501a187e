"""The RunPod door: the runpod SDK's handler, progress updates to RunPod, the worker loop and `main`. The
job itself is the job service's (service/); this module only turns a RunPod job into a call to it and its
outcome into what the SDK expects (an `error` string fails the job; `refresh_worker` restarts the worker).
The handler is async, so a RunPod cancel reaches the pipeline's cancel check.

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.worker --test_input "$(cat examples/tiny_job.json)"
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from multitalk_worker.config import Settings, SettingsError, settings_from_process
from multitalk_worker.logs import configure_logging
from multitalk_worker.progress import Snapshot
from multitalk_worker.redact import RedactingStream
from multitalk_worker.service import JobOutcome, JobService, safe_id
from multitalk_worker.service.resident import PipelineHolder
from multitalk_worker.startup import register_fitness_checks, worker_version

logger = logging.getLogger(__name__)


def runpod_result(outcome: JobOutcome) -> dict[str, Any]:
    """The runpod SDK's form: an `error` string fails the job; `refresh_worker` restarts the worker."""
    if outcome.error is None:
        return dict(outcome.output or {})
    out: dict[str, Any] = {"error": json.dumps(outcome.error)}
    if outcome.refresh_worker:
        out["refresh_worker"] = True
    return out


def make_handler(service: JobService) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """An async runpod handler: the job runs in a thread; a RunPod cancel sets the pipeline's cancel flag."""

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(service.run, job, cancel))
        try:
            outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            logger.info("job %s cancelled by RunPod; stopping at the next step", safe_id(job.get("id")))
            await asyncio.wait({task})
            raise
        return runpod_result(outcome)

    return handler


def runpod_progress(job: dict[str, Any], snapshot: Snapshot) -> None:
    """Send one progress update to RunPod's queue (visible in /status while the job runs): the job's
    progress snapshot (progress.py), the same fields as the local API's `progress`."""
    import runpod

    runpod.serverless.progress_update(job, snapshot.to_dict())


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
    """Run the runpod SDK's worker loop with a JobService (its `--test_input` mode exits when done)."""
    import runpod

    service = JobService(
        settings, progress_sink=runpod_progress if settings.on_runpod else None, holder=holder
    )
    if settings.on_runpod:
        register_fitness_checks(settings, service.holder)
    else:  # local mode: the SDK prints each job's result at INFO, presigned URLs included
        sys.stdout = RedactingStream(sys.stdout)
    logger.info("multitalk-worker %s starting (weights: %s)", worker_version(settings), settings.weights)
    from multitalk_worker.weights.download import ensure_weights

    ensure_weights(settings)  # MULTITALK_FETCH_WEIGHTS; a failure stops the worker before it takes a job
    runpod.serverless.start({"handler": make_handler(service)})


if __name__ == "__main__":
    main()
