"""The local HTTP API's job queue: bounded, in memory, one job at a time on the resident pipeline.

`JobQueue.submit` records a job and queues it, or raises `QueueFull` when `MULTITALK_QUEUE_SIZE` jobs already
wait; one thread runs the queued jobs in order through `JobService.run`, with a cancel flag per job; the
job's latest progress snapshot (progress.py, from the service's tracker) is kept on its record, and every
snapshot for `/stream` until read. A job's RunPod
policy is enforced here: past `executionTimeout` (from its start) or `ttl` (from its submission) it ends
TIMED_OUT, a running one at its next denoising step. `purge` drops every waiting job. A finished job's record
and video file are kept for `MULTITALK_JOB_TTL_S` seconds after it ends, then deleted. Everything lives in
this process: a restart loses the queue, the records and the files (docs/api.md says so).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from multitalk_worker.errors import Cancelled, TimedOut
from multitalk_worker.local_api.store import JobStore, StoredJob
from multitalk_worker.progress import QUEUED, Snapshot
from multitalk_worker.service import JobService

logger = logging.getLogger(__name__)

JobStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
FINISHED: tuple[JobStatus, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
STREAM_KEPT = 10_000  # progress updates kept for /stream until read (a 40-step, 18-clip job makes ~800)
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
    execution_timeout_s: float | None = None  # policy.executionTimeout, from started_at
    ttl_s: float | None = None  # policy.ttl, from created_at
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: TimedOut | None = None  # set when a limit passed; the run then stops at its next step
    progress: Snapshot = QUEUED  # replaced, never changed: a reader in another thread sees a whole one
    stream: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=STREAM_KEPT))
    listeners: list[Callable[[], object]] = field(default_factory=list)
    user_cancelled: bool = False  # /cancel (a stop of the server is not a cancel: the job resumes)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def deadline(self) -> tuple[float, TimedOut] | None:
        """When the job must have ended (Unix seconds) and the error it then ends with; None: no limit."""
        limits = []
        if self.ttl_s is not None:
            limits.append(
                (
                    self.created_at + self.ttl_s,
                    TimedOut(f"the job outlived policy.ttl ({self.ttl_s * 1000:.0f} ms from submission)"),
                )
            )
        if self.execution_timeout_s is not None and self.started_at is not None:
            limits.append(
                (
                    self.started_at + self.execution_timeout_s,
                    TimedOut(
                        f"the job ran past policy.executionTimeout ({self.execution_timeout_s * 1000:.0f} "
                        "ms); give a longer one (docs/deploy.md shows how to size it)"
                    ),
                )
            )
        return min(limits, key=lambda limit: limit[0]) if limits else None


class JobQueue:
    """Queue and runner. Every public method is thread-safe and returns at once."""

    def __init__(
        self,
        worker: JobService,
        *,
        capacity: int,
        ttl_s: float,
        results: Path,
        store: JobStore | None = None,
    ) -> None:
        self.worker = worker
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.results = results
        self.store = store
        self._jobs: dict[str, JobRecord] = {}
        self._waiting: deque[str] = deque()
        self._restore()
        self._running: str | None = None
        self._totals: Counter[str] = Counter()  # jobs ended since start, by status (RunPod's /health)
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run_forever, name="multitalk-jobs", daemon=True)

    @classmethod
    def for_worker(cls, worker: JobService) -> JobQueue:
        """A queue sized by the worker's settings: durable in MULTITALK_API_DATA_DIR when set (`jobs.db`,
        `results/`), else in memory with its files in a fresh folder under the work dir."""
        settings = worker.settings
        size = {"capacity": settings.queue_size, "ttl_s": settings.job_ttl_s}
        if settings.api_data_dir is not None:
            results = settings.api_data_dir / "results"
            results.mkdir(parents=True, exist_ok=True)
            return cls(worker, **size, results=results, store=JobStore(settings.api_data_dir / "jobs.db"))
        results = Path(tempfile.mkdtemp(prefix="multitalk-results-", dir=settings.work_dir))
        return cls(worker, **size, results=results)

    # -- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the running job at its next step and wait for the runner. Without a store: drop the queue and
        delete every file; with one the jobs stay as stored (the running one IN_PROGRESS, to resume)."""
        with self._lock:
            self._stopped = True
            for record in self._jobs.values():
                record.cancel.set()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        if self.store is None:
            shutil.rmtree(self.results, ignore_errors=True)
        else:
            self.store.close()

    # -- API

    def submit(
        self, raw_input: Any, *, execution_timeout_s: float | None = None, ttl_s: float | None = None
    ) -> JobRecord:
        with self._lock:
            self._purge_expired()
            if len(self._waiting) >= self.capacity:
                raise QueueFull(
                    f"{len(self._waiting)} jobs are waiting (MULTITALK_QUEUE_SIZE={self.capacity}); "
                    "retry when one has finished"
                )
            record = JobRecord(
                id=uuid.uuid4().hex,
                input=raw_input,
                created_at=time.time(),
                execution_timeout_s=execution_timeout_s,
                ttl_s=ttl_s,
            )
            self._jobs[record.id] = record
            self._waiting.append(record.id)
            self._save(record)
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
            record.user_cancelled = True
            record.cancel.set()
            if record.status == "IN_QUEUE":
                self._end_queued(record, "CANCELLED", "cancelled while queued")
            return record

    def purge(self) -> int:
        """Every waiting job ends CANCELLED (the running one goes on); returns how many."""
        with self._lock:
            waiting = [self._jobs[job_id] for job_id in self._waiting]
            for record in waiting:
                record.cancel.set()
                self._end_queued(record, "CANCELLED", "removed from the queue by /purge-queue")
            return len(waiting)

    def take_stream(self, record: JobRecord) -> list[dict[str, Any]]:
        """The progress updates not read yet, oldest first; each is read once (RunPod's /stream)."""
        with self._lock:
            updates = list(record.stream)
            record.stream.clear()
            return updates

    def position(self, job_id: str) -> int | None:
        """1 for the next job to run; None when not waiting."""
        with self._lock:
            try:
                return self._waiting.index(job_id) + 1
            except ValueError:
                return None

    def on_finish(self, record: JobRecord, listener: Callable[[], object]) -> None:
        """Call `listener` (from any thread) once the job has finished; at once when it already has. What it
        returns is ignored."""
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

    def totals(self) -> dict[str, int]:
        """Jobs ended since start by status, and the queue now (RunPod's /health counts)."""
        with self._lock:
            return {
                **{status: self._totals[status] for status in FINISHED},
                "IN_QUEUE": len(self._waiting),
                "IN_PROGRESS": int(self._running is not None),
            }

    # -- runner

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                self._purge_expired()  # a waiting job past its policy.ttl ends without running
                while not self._waiting and not self._stopped:
                    self._lock.wait(timeout=PURGE_INTERVAL_S)
                    self._purge_expired()
                if self._stopped:
                    return
                record = self._jobs[self._waiting.popleft()]
                record.status = "IN_PROGRESS"
                record.started_at = record.started_at or time.time()  # a resumed job keeps its start
                self._running = record.id
                self._save(record)
            self._run_one(record)

    def _run_one(self, record: JobRecord) -> None:
        video = self.results / f"{record.id}.mp4"
        watchdog = self._watch(record)
        try:
            outcome = self.worker.run(
                {"id": record.id, "input": record.input},
                record.cancel,
                local_video=video,
                on_update=lambda snapshot: self._progress(record, snapshot),
            )
        finally:
            if watchdog is not None:
                watchdog.cancel()
        with self._lock:
            self._running = None
            stopped = outcome.error is not None and outcome.error["code"] == "CANCELLED"
            if stopped and self._stopped and not record.user_cancelled and record.timed_out is None:
                logger.info(
                    "job %s stays IN_PROGRESS: the server stopped; it resumes at the next start", record.id
                )
                return  # stored IN_PROGRESS with its input: the next start runs it from its checkpoint
            record.input = None  # the inputs (base64 payloads included) are not kept for the TTL
            record.output, record.error = outcome.output, outcome.error
            if outcome.error is None:
                record.video = video if video.is_file() else None
                self._finish(record, "COMPLETED")
            elif outcome.error["code"] == "CANCELLED" and record.timed_out is not None:
                record.error = record.timed_out.to_dict()
                self._finish(record, "TIMED_OUT")
            else:
                self._finish(record, "CANCELLED" if outcome.error["code"] == "CANCELLED" else "FAILED")

    def _watch(self, record: JobRecord) -> threading.Timer | None:
        """A timer that stops the running job at its deadline (it ends at its next denoising step)."""
        limit = record.deadline()
        if limit is None:
            return None
        at, error = limit

        def expire() -> None:
            record.timed_out = error
            record.cancel.set()

        timer = threading.Timer(max(at - time.time(), 0.0), expire)
        timer.daemon = True
        timer.start()
        return timer

    def _progress(self, record: JobRecord, snapshot: Snapshot) -> None:
        with self._lock:
            record.progress = snapshot
            record.stream.append(snapshot.to_dict())

    def _end_queued(self, record: JobRecord, status: JobStatus, message: str) -> None:
        """Under the lock: a waiting job ends without running (cancelled, purged or past its ttl)."""
        self._waiting.remove(record.id)
        record.input = None
        error = TimedOut if status == "TIMED_OUT" else Cancelled
        record.error = error(message, stage="queue").to_dict()
        self._finish(record, status)

    def _finish(self, record: JobRecord, status: JobStatus) -> None:
        """Under the lock."""
        record.status, record.finished_at = status, time.time()
        self._totals[status] += 1
        self._save(record)
        listeners, record.listeners = record.listeners, []
        for listener in listeners:
            listener()

    def _purge_expired(self) -> None:
        """Under the lock: waiting jobs past their policy.ttl end TIMED_OUT; jobs that ended more than ttl_s
        ago are forgotten, with their files."""
        now = time.time()
        for job_id in list(self._waiting):
            record = self._jobs[job_id]
            limit = record.deadline()
            if limit is not None and limit[0] <= now:
                self._end_queued(record, "TIMED_OUT", limit[1].message)
        for job_id in [
            r.id
            for r in self._jobs.values()
            if r.finished_at is not None and now - r.finished_at > self.ttl_s
        ]:
            record = self._jobs.pop(job_id)
            if record.video is not None:
                record.video.unlink(missing_ok=True)
            if self.store is not None:
                self.store.delete(job_id)
            logger.info("job %s expired after %.0f s", job_id, self.ttl_s)

    # -- the store

    def _save(self, record: JobRecord) -> None:
        """Under the lock (or before the runner starts): write the record through to the store."""
        if self.store is None:
            return
        self.store.put(
            StoredJob(
                id=record.id,
                status=record.status,
                created_at=record.created_at,
                started_at=record.started_at,
                finished_at=record.finished_at,
                input=record.input,
                output=record.output,
                error=record.error,
                video=record.video,
                execution_timeout_s=record.execution_timeout_s,
                ttl_s=record.ttl_s,
            )
        )

    def _restore(self) -> None:
        """The stored jobs, as the last process left them: finished ones listed (expired ones dropped on the
        next purge), the one that was running first in the queue (it resumes from its checkpoint), then the
        queued ones in order."""
        if self.store is None:
            return
        stored = self.store.load()
        for job in stored:
            record = JobRecord(
                id=job.id,
                input=job.input,
                created_at=job.created_at,
                status=job.status if job.status in FINISHED else "IN_QUEUE",
                started_at=job.started_at,
                finished_at=job.finished_at,
                output=job.output,
                error=job.error,
                video=job.video,
                execution_timeout_s=job.execution_timeout_s,
                ttl_s=job.ttl_s,
            )
            self._jobs[record.id] = record
        running = [j.id for j in stored if j.status == "IN_PROGRESS"]
        queued = [j.id for j in stored if j.status == "IN_QUEUE"]
        self._waiting.extend(running + queued)
        if running or queued:
            logger.info(
                "restored %d stored jobs: %d to resume, %d queued", len(stored), len(running), len(queued)
            )
