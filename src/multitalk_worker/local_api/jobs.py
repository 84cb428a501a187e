"""The local HTTP API's job queue: bounded, in memory, one job at a time on the resident pipeline.

`JobQueue.submit` records a job and queues it, or raises `QueueFull` when `MULTITALK_QUEUE_SIZE` jobs already
wait; one thread runs the queued jobs in order through `JobService.run`, with a cancel flag per job; the
job's latest progress snapshot (progress.py, from the service's tracker) is kept on its record. A finished
job's record and video file are kept for `MULTITALK_JOB_TTL_S` seconds after it ends, then deleted.
Everything lives in this process: a restart loses the queue, the records and the files (docs/api.md says so).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from multitalk_worker.progress import QUEUED, Snapshot
from multitalk_worker.service import JobService

logger = logging.getLogger(__name__)

JobStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]
FINISHED: tuple[JobStatus, ...] = ("COMPLETED", "FAILED", "CANCELLED")
PURGE_INTERVAL_S = 5.0  # how often the runner looks for expired jobs while idle


class QueueFull(Exception):
    """No room in the queue; the caller answers 429."""


@dataclass
class JobRecord:
    id: str
    input: Any
    created_at: float
    status: JobStatus = "IN_QUEUE"
    started_at: float | None = None
    finished_at: float | None = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    video: Path | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Snapshot = QUEUED  # replaced, never changed: a reader in another thread sees a whole one
    listeners: list[Callable[[], object]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobQueue:
    """Queue and runner. Every public method is thread-safe and returns at once."""

    def __init__(self, worker: JobService, *, capacity: int, ttl_s: float, results: Path) -> None:
        self.worker = worker
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.results = results
        self._jobs: dict[str, JobRecord] = {}
        self._waiting: deque[str] = deque()
        self._running: str | None = None
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run_forever, name="multitalk-jobs", daemon=True)

    @classmethod
    def for_worker(cls, worker: JobService) -> JobQueue:
        """A queue sized by the worker's settings, its files in a fresh folder under the work dir."""
        settings = worker.settings
        results = Path(tempfile.mkdtemp(prefix="multitalk-results-", dir=settings.work_dir))
        return cls(worker, capacity=settings.queue_size, ttl_s=settings.job_ttl_s, results=results)

    # -- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running job, drop the queue, wait for the runner, delete every file."""
        with self._lock:
            self._stopped = True
            for record in self._jobs.values():
                record.cancel.set()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        shutil.rmtree(self.results, ignore_errors=True)

    # -- API

    def submit(self, raw_input: Any) -> JobRecord:
        with self._lock:
            self._purge_expired()
            if len(self._waiting) >= self.capacity:
                raise QueueFull(
                    f"{len(self._waiting)} jobs are waiting (MULTITALK_QUEUE_SIZE={self.capacity}); "
                    "retry when one has finished"
                )
            record = JobRecord(id=uuid.uuid4().hex, input=raw_input, created_at=time.time())
            self._jobs[record.id] = record
            self._waiting.append(record.id)
            self._lock.notify_all()
            return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._purge_expired()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> JobRecord | None:
        """A queued job ends CANCELLED at once; a running one stops at its next step."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None or record.finished:
                return record
            record.cancel.set()
            if record.status == "IN_QUEUE":
                self._waiting.remove(job_id)
                record.input = None
                record.error = {
                    "code": "CANCELLED",
                    "message": "cancelled while queued",
                    "stage": "queue",
                    "retryable": False,
                }
                self._finish(record, "CANCELLED")
            return record

    def position(self, job_id: str) -> int | None:
        """1 for the next job to run; None when not waiting."""
        with self._lock:
            try:
                return self._waiting.index(job_id) + 1
            except ValueError:
                return None

    def on_finish(self, record: JobRecord, listener: Callable[[], object]) -> None:
        """Call `listener` (from any thread) once the job has finished; at once when it already has."""
        with self._lock:
            if not record.finished:
                record.listeners.append(listener)
                return
        listener()

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self._running,
                "waiting": len(self._waiting),
                "capacity": self.capacity,
                "kept": sum(1 for r in self._jobs.values() if r.finished),
            }

    # -- runner

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopped:
                    self._lock.wait(timeout=PURGE_INTERVAL_S)
                    self._purge_expired()
                if self._stopped:
                    return
                record = self._jobs[self._waiting.popleft()]
                record.status, record.started_at = "IN_PROGRESS", time.time()
                self._running = record.id
            self._run_one(record)

    def _run_one(self, record: JobRecord) -> None:
        video = self.results / f"{record.id}.mp4"
        outcome = self.worker.run(
            {"id": record.id, "input": record.input},
            record.cancel,
            local_video=video,
            on_update=lambda snapshot: setattr(record, "progress", snapshot),
        )
        with self._lock:
            self._running = None
            record.input = None  # the inputs (base64 payloads included) are not kept for the TTL
            record.output, record.error = outcome.output, outcome.error
            if outcome.error is None:
                record.video = video if video.is_file() else None
                self._finish(record, "COMPLETED")
            else:
                self._finish(record, "CANCELLED" if outcome.error["code"] == "CANCELLED" else "FAILED")

    def _finish(self, record: JobRecord, status: JobStatus) -> None:
        """Under the lock."""
        record.status, record.finished_at = status, time.time()
        listeners, record.listeners = record.listeners, []
        for listener in listeners:
            listener()

    def _purge_expired(self) -> None:
        """Under the lock: forget jobs that ended more than ttl_s ago, with their files."""
        now = time.time()
        for job_id in [
            r.id
            for r in self._jobs.values()
            if r.finished_at is not None and now - r.finished_at > self.ttl_s
        ]:
            record = self._jobs.pop(job_id)
            if record.video is not None:
                record.video.unlink(missing_ok=True)
            logger.info("job %s expired after %.0f s", job_id, self.ttl_s)
