"""progress.py: the one event type and tracker behind every door. Percent (the share of steps and decodes,
never back, 100 only when finished) and an ETA that counts each clip's decode, on a scripted clock; the CLI's
bar shows the same snapshot."""

from __future__ import annotations

import re

import pytest

from multitalk_worker.cli import StageReport
from multitalk_worker.progress import Progress, ProgressTracker, percent_done


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job_events(clips: int, steps: int) -> list[Progress]:
    """The events of one job in the pipeline's order (pipeline/pipeline.py)."""
    events = [Progress("audio"), Progress("text")]
    for clip in range(1, clips + 1):
        events.append(Progress("condition", clip, clips, 0, steps))
        events += [Progress("sample", clip, clips, step, steps) for step in range(1, steps + 1)]
        events.append(Progress("decode", clip, clips, steps, steps))
    return events


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
    assert after.percent == 62.5  # 3 steps + 1 decode + 1 step of 2 x (3 + 1) units
    encoding = tracker.update(Progress("encode"))  # a stage of the job service: counts and ETA kept
    assert (encoding.stage, encoding.chunk, encoding.step, encoding.eta_s) == ("encode", 2, 1, after.eta_s)


def test_percent_is_the_share_of_steps_and_decodes_and_never_goes_back() -> None:
    """Each step one unit, each clip's decode one more (done when the next clip starts): 2 clips x 3
    steps are 8 units, so the last decode starts at 7/8; only the finished job shows 100."""
    clock = Clock()
    tracker = ProgressTracker(clock)
    shown = []
    for event in job_events(2, 3):
        clock.now += 1.5 if event.stage == "sample" else 7.0  # a slow decode does not move the percent
        shown.append(tracker.update(event).percent)
    assert shown == [None, None, 0.0, 12.5, 25.0, 37.5, 37.5, 50.0, 62.5, 75.0, 87.5, 87.5]
    last = tracker.snapshot()
    assert last.eta_s is not None and last.eta_s > 0 and last.percent is not None and last.percent < 100
    assert last.finished().percent == 100.0 and last.finished().eta_s == 0.0


@pytest.mark.parametrize(("clips", "steps"), [(1, 2000), (81, 40)])
def test_percent_shows_100_only_when_finished(clips: int, steps: int) -> None:
    """Floored to 0.1: a long job's last decode (2000/2001 = 99.95 %) shows 99.9, not 100."""
    assert percent_done(Progress("decode", clips, clips, steps, steps)) == 99.9


def test_snapshot_before_any_event() -> None:
    snapshot = ProgressTracker().snapshot()
    assert snapshot.stage == "queued" and snapshot.percent is None and snapshot.eta_s is None


def test_the_cli_bar_shows_the_tracker_snapshot_and_no_eta_at_100(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    report = StageReport(ProgressTracker(clock))
    for event in job_events(1, 3):
        clock.now += 2
        report(event)
    assert report.bar is not None
    assert report.bar.n == pytest.approx(75.0)  # 3 steps of 4 units: the decode runs
    assert "ETA" in str(report.bar.postfix)
    report.finish()
    assert report.bar is None
    renders = [r for r in re.split(r"[\r\n]+", capsys.readouterr().err) if r.startswith("progress:")]
    assert renders[-1].startswith("progress: 100.0%") and "clip 1/1 step 3/3, done" in renders[-1], renders
    assert not [r for r in renders if "100.0%" in r and "ETA" in r]
