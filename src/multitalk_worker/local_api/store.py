"""The local API's job records on disk: one SQLite database (the standard library's `sqlite3`) in the data
folder, written through by the queue (jobs.py) at every change of state, read back at start-up.

A row holds what /status answers and what a restart needs: the status, the times, the policy, the output or
error (JSON), the video file's path, and the job's input (JSON, base64 payloads included) only until the job
ends. Progress, cancel flags and /stream buffers are not stored: they belong to the running process.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    input TEXT,
    output TEXT,
    error TEXT,
    video TEXT,
    execution_timeout_s REAL,
    ttl_s REAL
)
"""


@dataclass(frozen=True)
class StoredJob:
    id: str
    status: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    input: Any = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    video: Path | None = None
    execution_timeout_s: float | None = None
    ttl_s: float | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(StoredJob))
JSON_FIELDS = ("input", "output", "error")


class JobStore:
    """Thread-safe: one connection, used under a lock (writes are a few a second at most)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # a reader never waits for a writer
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: committed rows survive a process kill
        self._db.execute("PRAGMA secure_delete=ON")  # a finished job's input (base64 payloads) is overwritten
        self._db.execute(SCHEMA)

    def put(self, job: StoredJob) -> None:
        """Insert or replace the job's row."""
        values = [_column(name, getattr(job, name)) for name in FIELDS]
        marks = ", ".join("?" for _ in FIELDS)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(FIELDS)}) VALUES ({marks})", values)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def load(self) -> list[StoredJob]:
        """Every stored job, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(FIELDS)} FROM jobs ORDER BY created_at").fetchall()
        return [
            StoredJob(**{name: _value(name, raw) for name, raw in zip(FIELDS, row, strict=True)})
            for row in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _column(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in JSON_FIELDS:
        return json.dumps(value)
    if name == "video":
        return str(value)
    return value


def _value(name: str, raw: Any) -> Any:
    if raw is None:
        return None
    if name in JSON_FIELDS:
        return json.loads(raw)
    if name == "video":
        return Path(raw)
    return raw
