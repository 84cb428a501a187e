"""The part so far of a running job, published as it grows (issue #22): after each finished clip the
finished segments are remuxed with their audio into one mp4 (segments.assemble_part: no re-encoding) and
handed to the job's `PartDelivery` (S3: the object `<key>.part` and its presigned URL). It runs in a
thread of its own, so the clip loop never waits on a remux or an upload; the newest clip count wins (counts
offered while an upload runs are folded into the next one). A part that cannot be published is logged and
skipped: the job's video is what the job is for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from multitalk_worker.errors import WorkerError
from multitalk_worker.io.delivery import PartDelivery
from multitalk_worker.progress import Snapshot
from multitalk_worker.segments import assemble_part

logger = logging.getLogger(__name__)


class PartPublisher:
    """`offer(clips)` after each progress event (returns at once); `annotate(snapshot)` adds the URL of the
    latest published part; `close()` waits for an upload under way and stops. `seconds`: the remux and
    upload time spent in the publisher's thread; `published`: the parts uploaded."""

    def __init__(self, delivery: PartDelivery, segments: Callable[[], Path], scratch: Path) -> None:
        self._delivery, self._segments, self._path = delivery, segments, scratch / "part.mp4"
        self._changed = threading.Condition()
        self._offered = 0  # the newest clip count offered
        self._taken = 0  # the clip count of the last part made (or tried)
        self._url: str | None = None
        self._clips = 0  # the clips of the part behind `_url`
        self._closed = False
        self.seconds = 0.0
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="part-publisher", daemon=True)
        self._thread.start()

    def offer(self, clips: int) -> None:
        with self._changed:
            if clips > self._offered:
                self._offered = clips
                self._changed.notify()

    def annotate(self, snapshot: Snapshot) -> Snapshot:
        with self._changed:
            if self._url is None:
                return snapshot
            return replace(snapshot, part_url=self._url, part_clips=self._clips)

    def close(self) -> None:
        """Stop: an upload under way finishes (so that nothing lands after the part is removed), counts
        offered after it are dropped (the whole video follows)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and self._offered <= self._taken:
                    self._changed.wait()
                if self._closed:
                    return
                self._taken = clips = self._offered
            self._publish(clips)

    def _publish(self, clips: int) -> None:
        start = time.perf_counter()
        try:
            count, frames = assemble_part(self._segments(), self._path, clips)
            delivered = self._delivery.deliver_part(self._path)
        except WorkerError as exc:
            logger.warning("the part so far after clip %d was not published: %s", clips, exc)
            return
        finally:
            self._path.unlink(missing_ok=True)
            self.seconds += time.perf_counter() - start
        with self._changed:
            self._url, self._clips = str(delivered["url"]), count
        self.published += 1
        logger.info(
            "published the part so far: %d clips, %d frames in %.2f s",
            count,
            frames,
            time.perf_counter() - start,
        )
