"""The part so far of a running job: its finished clips, assembled from the segments in the job's
checkpoint folder (segments.assemble_part) into one normal mp4 that browsers play, cached by segment count.

Only jobs with a checkpoint have one (MULTITALK_CHECKPOINTS on, the default): with checkpoints off the
segments live in the job's scratch folder, which only the running job knows.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from multitalk_worker.config import Settings
from multitalk_worker.errors import OutputInvalid
from multitalk_worker.segments import assemble_part, segment_count
from multitalk_worker.service import safe_id
from multitalk_worker.service.checkpoints import checkpoint_root

logger = logging.getLogger(__name__)


class PartSoFar:
    """`video(job_id)`: the mp4 of the job's finished clips (None while none is finished), written under
    `folder` as `<id>.part-<segments>.mp4` once per segment count; the previous count's file is removed."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        self._lock = threading.Lock()  # one assembly at a time: two requests never write one file

    def segments(self, job_id: str) -> Path:
        return checkpoint_root(self.settings) / safe_id(job_id) / "segments"

    def video(self, job_id: str) -> Path | None:
        if not self.settings.checkpoints:
            return None
        source = self.segments(job_id)
        count = segment_count(source)
        if not count:
            return None
        path = self.folder / f"{safe_id(job_id)}.part-{count}.mp4"
        with self._lock:
            if path.is_file():
                return path
            try:
                assemble_part(source, path, count)
            except OutputInvalid as exc:  # the job finished (its checkpoint removed) or started afresh
                logger.info("job %s: no part so far: %s", job_id, exc)
                return None
            for old in self.folder.glob(f"{safe_id(job_id)}.part-*.mp4"):
                if old != path:
                    old.unlink(missing_ok=True)
        return path
