"""Progress of one job as a person reads it: stage, clip i/n, step s/S, percent and an ETA that counts the
decode. Shared by the CLI's bar and the local HTTP API's `/status/{id}`.

The pipeline reports `Progress(stage, chunk, chunks, step, steps)` events: the preparation stages (audio,
text), then per clip a `condition` event, one `sample` event after each denoising step and one `decode` event
when the clip's VAE decode starts. The tracker times them:

* `step_s`: the mean time between two sample events of the same clip (one denoising step, all its passes);
* `between_s`: the time from the first clip's `decode` event to the next clip's first step, less one step:
  the decode, colour match and the next clip's conditioning. Until the first clip has been decoded it is
  unknown and the ETA counts it as one step's time (an estimate, marked by `between_measured` False).

ETA = remaining steps × step_s + remaining decodes × between_s. No ETA before two steps are timed, nor while
a decode runs longer than counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol


class ProgressEvent(Protocol):
    stage: str
    chunk: int
    chunks: int
    step: int
    steps: int


@dataclass(frozen=True)
class Snapshot:
    stage: str
    chunk: int
    chunks: int
    step: int
    steps: int
    percent: float | None  # of the sampling and decoding work; None before sampling starts
    eta_s: float | None  # None until two steps are timed
    step_s: float | None
    between_measured: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def finished(self) -> Snapshot:
        """The same snapshot for a job that has ended: all its work done."""
        return replace(self, percent=100.0, eta_s=0.0)


class ProgressTracker:
    """Feed it every event (`update`); read `snapshot()` at any time. Not thread-safe: one writer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: ProgressEvent | None = None
        self._last_at = 0.0
        self._step_total = 0.0
        self._step_count = 0
        self._decode_at: float | None = None
        self._between_s: float | None = None
        self.stage = "queued"
        self._extra_stage: str | None = None

    def set_stage(self, stage: str) -> None:
        """A stage outside the pipeline (fetch, load, encode, verify, output): shown, ETA kept."""
        self._extra_stage = stage

    def update(self, event: ProgressEvent) -> Snapshot:
        now = self._clock()
        last = self._last
        self._extra_stage = None
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
        stage = self._extra_stage or (event.stage if event is not None else self.stage)
        if event is None:
            return Snapshot(stage, 0, 0, 0, 0, None, None, None, False)
        percent, eta = self._estimate(event)
        return Snapshot(
            stage,
            event.chunk,
            event.chunks,
            event.step,
            event.steps,
            percent,
            eta,
            self.step_s,
            self._between_s is not None,
        )

    def _estimate(self, event: ProgressEvent) -> tuple[float | None, float | None]:
        if event.stage not in ("condition", "sample", "decode") or event.chunks < 1 or event.steps < 1:
            return None, None
        done_clips = event.chunk - 1  # clips whose decode is over
        steps_done = event.step  # 0 while the clip's conditioning runs
        decoding = event.stage == "decode"
        # work units: one per step, one "decode" per clip weighing between/step steps
        step = self.step_s
        between = self._between_s if self._between_s is not None else step
        weight = (between / step) if step and between is not None else 1.0
        total = event.chunks * (event.steps + weight)
        done = done_clips * (event.steps + weight) + steps_done
        percent = round(100.0 * min(done / total, 1.0), 1)
        if step is None or between is None:
            return percent, None
        remaining_steps = (event.chunks - event.chunk) * event.steps + (event.steps - steps_done)
        remaining_decodes = event.chunks - done_clips
        eta = remaining_steps * step + remaining_decodes * between
        if decoding and self._decode_at is not None:
            elapsed = self._clock() - self._decode_at
            if elapsed > between:  # this decode runs longer than counted: no honest ETA until it ends
                return percent, None
            eta -= elapsed
        return percent, round(max(eta, 0.0), 1)
