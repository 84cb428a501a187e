"""local_api/store.py: job rows survive the process (a second connection, as after a restart, reads what the
first wrote), the input goes when the job ends, JSON fields come back as they went in."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from multitalk_worker.local_api.store import JobStore, StoredJob

INPUT = {"image": "data:image/png;base64,iVBORw0KGgo=", "speakers": [{"audio": "inputs/a.wav"}]}


def test_rows_survive_a_killed_writer(tmp_path: Path) -> None:
    """A process writes two jobs and is killed (SIGKILL: no close, no clean-up); a new store reads both."""
    script = (
        "import sys, os, signal\n"
        "from pathlib import Path\n"
        "from multitalk_worker.local_api.store import JobStore, StoredJob\n"
        "store = JobStore(Path(sys.argv[1]))\n"
        f"store.put(StoredJob('a', 'IN_PROGRESS', 1.0, started_at=2.0, input={INPUT!r}))\n"
        "store.put(StoredJob('b', 'IN_QUEUE', 3.0, input={'x': 1}))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    process = subprocess.run([sys.executable, "-c", script, str(tmp_path / "jobs.db")], check=False)
    assert process.returncode == -9
    store = JobStore(tmp_path / "jobs.db")
    running, queued = store.load()
    assert running == StoredJob("a", "IN_PROGRESS", 1.0, started_at=2.0, input=INPUT)
    assert (queued.id, queued.status, queued.input) == ("b", "IN_QUEUE", {"x": 1})


def test_a_finished_job_keeps_its_result_not_its_input(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job = StoredJob("a", "IN_QUEUE", 1.0, input=INPUT, ttl_s=60.0)
    store.put(job)
    done = dataclasses.replace(
        job,
        status="COMPLETED",
        finished_at=9.5,
        input=None,
        output={"video": {"delivery": "local"}, "frames": 81},
        video=tmp_path / "a.mp4",
    )
    store.put(done)
    store.put(StoredJob("b", "FAILED", 2.0, error={"code": "INVALID_INPUT", "message": "no"}))
    store.close()
    again = JobStore(tmp_path / "jobs.db")
    assert again.load() == [
        done,
        StoredJob("b", "FAILED", 2.0, error={"code": "INVALID_INPUT", "message": "no"}),
    ]
    assert b"iVBORw0KGgo" not in (tmp_path / "jobs.db").read_bytes() + _wal(tmp_path)
    again.delete("a")
    assert [j.id for j in again.load()] == ["b"]


def _wal(folder: Path) -> bytes:
    wal = folder / "jobs.db-wal"
    return wal.read_bytes() if wal.exists() else b""
