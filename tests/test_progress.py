"""ProgressTracker: percent and an ETA that counts each clip's decode, on a scripted clock."""

from __future__ import annotations

import pytest

from multitalk_worker.pipeline.request import Progress
from multitalk_worker.progress import ProgressTracker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_counts_steps_and_the_decode_of_every_clip() -> None:
    """2 clips x 3 steps, 2 s per step, decode (+ next clip's conditioning) 5 s."""
    clock = Clock()
    tracker = ProgressTracker(clock)
    for stage in ("audio", "text"):
        assert tracker.update(Progress(stage, 0, 0, 0, 3)).eta_s is None
    assert tracker.update(Progress("condition", 1, 2, 0, 3)).percent == 0.0
    clock.now += 2
    first = tracker.update(Progress("sample", 1, 2, 1, 3))
    assert first.eta_s is None and first.stage == "sample"  # one step is not a rate yet
    clock.now += 2
    second = tracker.update(Progress("sample", 1, 2, 2, 3))
    # 4 steps left (2 s each) + 2 decodes, counted as one step each until one is measured
    assert second.step_s == pytest.approx(2.0) and second.eta_s == pytest.approx(4 * 2 + 2 * 2)
    assert not second.between_measured
    clock.now += 2
    tracker.update(Progress("sample", 1, 2, 3, 3))
    decoding = tracker.update(Progress("decode", 1, 2, 3, 3))
    assert decoding.stage == "decode" and decoding.eta_s == pytest.approx(3 * 2 + 2 * 2)
    clock.now += 4
    tracker.update(Progress("condition", 2, 2, 0, 3))  # the decode took 4 s, the conditioning takes 1 s
    clock.now += 1 + 2  # then clip 2's first step (2 s)
    after = tracker.update(Progress("sample", 2, 2, 1, 3))
    assert after.between_measured and after.eta_s == pytest.approx(2 * 2 + 5)
    assert after.percent == pytest.approx(100 * (3 + 2.5 + 1) / (2 * (3 + 2.5)), abs=0.1)
    tracker.set_stage("encode")
    assert tracker.snapshot().stage == "encode"


def test_snapshot_before_any_event() -> None:
    snapshot = ProgressTracker().snapshot()
    assert snapshot.stage == "queued" and snapshot.percent is None and snapshot.eta_s is None
