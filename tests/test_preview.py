"""validate_only's plan: the region preview PNG (the bucket crop with each speaker's mask as the model sees
it), clip count, frames, DiT passes and the GPU-time estimate from measured seconds per pass."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from multitalk_worker.config import Settings
from multitalk_worker.estimate import PASS_TIMINGS, estimate_gpu_s
from multitalk_worker.preview import SPEAKER_COLOURS
from multitalk_worker.service import JobService

TWO = {
    "image": "inputs/two_people.png",
    "speakers": [
        {"audio": "inputs/speech_a.wav", "region": [0.0, 0.0, 0.5, 1.0]},
        {"audio": "inputs/speech_b.wav", "region": [0.5, 0.0, 1.0, 1.0]},
    ],
    "prompt": "two people talk",
    "resolution": "480p",
    "validate_only": True,
    "advanced": {"steps": 10},
}


def _png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"))


def test_preview_shows_the_bucket_crop_with_each_speakers_mask(
    make_settings: Callable[..., Settings],
) -> None:
    outcome = JobService(make_settings()).run({"id": "p", "input": TWO})
    assert outcome.error is None, outcome.error
    plan = outcome.output["plan"]  # type: ignore[index]
    height, width = plan["bucket"]
    picture = _png(plan["preview_png"])
    assert picture.shape == (height, width, 3) == (448, 896, 3)  # two_people.png 640x360 -> the 0.50 bucket
    left, right = (
        picture[height // 2, width // 4].astype(int),
        picture[height // 2, 3 * width // 4].astype(int),
    )
    # each half is tinted towards its speaker's colour: orange (red > blue) left, blue right
    assert left[0] - left[2] > right[0] - right[2]
    assert (picture[:, 0] == SPEAKER_COLOURS[0]).all(axis=1).any()  # speaker 1's outline at the left edge
    # speech_a is 102 audio frames, speech_b 87; parallel: the longer -> 99 frames, 2 clips
    assert (plan["clips"], plan["frames"], plan["passes_per_step"]) == (2, 99, 3)
    assert plan["passes"] == 2 * 10 * 3
    assert plan["estimate"] == {"gpu_s": None, "reason": "the built-in tiny model has no measured timings"}


def test_estimate_from_the_measured_table() -> None:
    row = next(r for r in PASS_TIMINGS if r.engine == "fast" and r.resolution == "480p")
    got = estimate_gpu_s(
        gpu_name="NVIDIA H100 80GB HBM3", engine="fast", resolution="480p", clips=2, steps=4, passes=2
    )
    assert got["gpu_s"] == pytest.approx(2 * (4 * 2 * row.pass_s + row.clip_s), abs=0.05)
    assert got["source"].startswith("bench/RESULTS.md run H4")
    # run H4: DiT 25.76 s for 4 steps x 2 passes; condition, decode, colour, frames 3.20 s: a clip 28.96 s
    one = estimate_gpu_s(gpu_name="H100", engine="fast", resolution="480p", clips=1, steps=4, passes=2)
    assert one["gpu_s"] == pytest.approx(28.96, abs=0.05)
    unknown = estimate_gpu_s(
        gpu_name="NVIDIA H200", engine="fast", resolution="480p", clips=1, steps=4, passes=2
    )
    assert unknown["gpu_s"] is None and "H100 fast 480p" in unknown["reason"]
