"""Progress of one job: the one event type (`Progress`) and the one tracker (`ProgressTracker`) that turns
events into what a person reads (`Snapshot`: stage, clip i/n, step s/S, percent, ETA). Every door shows the
same snapshot: the RunPod progress updates, the local API's `/status/{id}` and the CLI's bar.

Events. The pipeline reports the preparation stages (`audio`, `text`), then per clip a `condition` event,
one `sample` event after each denoising step and one `decode` event when the clip's VAE decode starts. The
job service adds its own stages (`fetch`, `validate`, `load`, `generate`, `encode`, `verify`, `output`) as
events without clip counts (`chunks` 0): they change the stage shown and keep the clip counts and the ETA.

Percent: the share of the job's work units done, where one unit is one denoising step and each clip's VAE
decode counts as one more (a clip's decode is done when the next clip starts). So it never goes back, it
moves with the `step`/`chunk` counters, and it reaches 100 only when the job has finished
(`Snapshot.finished`): after the last denoising step the last decode is still to come. None before the clip
loop starts (the number of steps is not known yet).

ETA, timed by the tracker:

* `step_s`: the mean time between two sample events of the same clip (one denoising step, all its passes);
* `between_s`: the time from the first clip's `decode` event to the next clip's first step, less one step:
  the decode, colour match and the next clip's conditioning. Until the first clip has been decoded it is
  unknown and the ETA counts it as one step's time (an estimate, marked by `between_measured` False).

ETA = remaining steps × step_s + remaining decodes × between_s. No ETA before two steps are timed, nor while
a decode runs longer than counted; 0 once the job has finished.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

CLIP_STAGES = ("condition", "sample", "decode")  # the events that carry clip and step counts


@dataclass(frozen=True)
class Progress:
    """One progress event. `chunk` is the 1-based clip, `step` the 1-based denoising step within it (0
    outside sampling); all four counts are 0 for a stage outside the clip loop."""

    stage: str
    chunk: int = 0
    chunks: int = 0
    step: int = 0
    steps: int = 0


@dataclass(frozen=True)
class Snapshot:
    stage: str
    chunk: int
    chunks: int
    step: int
    steps: int
    percent: float | None  # of the job's steps and decodes (module docstring); None before the clip loop
    eta_s: float | None  # None until two steps are timed
    step_s: float | None
    between_measured: bool
    clips_done: int = 0  # clips finished and encoded, a resumed job's included (the job service sets it)
    ready_s: float = 0.0  # their seconds of video: the part so far
    # S3 delivery: a presigned URL of the part so far, once one is uploaded; out of the repr (logged at DEBUG)
    part_url: str | None = field(default=None, repr=False)
    part_clips: int = 0  # the clips that part holds (the upload runs behind `clips_done`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def finished(self) -> Snapshot:
        """The same snapshot for a job that has ended: all its work done."""
        return replace(self, percent=100.0, eta_s=0.0)


QUEUED = Snapshot("queued", 0, 0, 0, 0, None, None, None, False)  # a job before its first event


def percent_done(event: Progress) -> float | None:
    """The share of work units done at `event` (module docstring), floored to 0.1 so that only a finished
    job shows 100."""
    if event.stage not in CLIP_STAGES or event.chunks < 1 or event.steps < 1:
        return None
    per_clip = event.steps + 1  # its steps and its decode
    done = (event.chunk - 1) * per_clip + event.step
    return math.floor(1000 * done / (event.chunks * per_clip)) / 10


class ProgressTracker:
    """Feed it every event (`update`); read `snapshot()` at any time. Not thread-safe: one writer; a reader
    in another thread keeps the `Snapshot` that `update` returns (frozen)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: Progress | None = None  # the last event with clip counts
        self._last_at = 0.0
        self._step_total = 0.0
        self._step_count = 0
        self._decode_at: float | None = None
        self._between_s: float | None = None
        self.stage = "queued"

    def update(self, event: Progress) -> Snapshot:
        self.stage = event.stage
        if event.chunks < 1:  # a stage outside the clip loop: shown, the counts and the ETA kept
            return self.snapshot()
        now = self._clock()
        last = self._last
        if event.stage == "sample":
            if last is not None and last.stage == "sample" and last.chunk == event.chunk:
                self._step_total += now - self._last_at
                self._step_count += 1
            elif self._decode_at is not None and self._between_s is None:  # the first step after a decode
                step = self.step_s or 0.0
                self._between_s = max(0.0, now - self._decode_at - step)
        elif event.stage == "decode":
            self._decode_at = now
        self._last, self._last_at = event, now
        return self.snapshot()

    @property
    def step_s(self) -> float | None:
        return self._step_total / self._step_count if self._step_count else None

    def snapshot(self) -> Snapshot:
        event = self._last
        if event is None:
            return replace(QUEUED, stage=self.stage)
        return Snapshot(
            self.stage,
            event.chunk,
            event.chunks,
            event.step,
            event.steps,
            percent_done(event),
            self._eta(event),
            self.step_s,
            self._between_s is not None,
        )

    def _eta(self, event: Progress) -> float | None:
        step = self.step_s
        between = self._between_s if self._between_s is not None else step
        if step is None or between is None:
            return None
        done_clips = event.chunk - 1  # clips whose decode is over
        remaining_steps = (event.chunks - event.chunk) * event.steps + (event.steps - event.step)
        eta = remaining_steps * step + (event.chunks - done_clips) * between
        if event.stage == "decode" and self._decode_at is not None:
            elapsed = self._clock() - self._decode_at
            if elapsed > between:  # this decode runs longer than counted: no honest ETA until it ends
                return None
            eta -= elapsed
        return round(max(eta, 0.0), 1)
