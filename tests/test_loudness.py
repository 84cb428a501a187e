"""The streamed BS.1770 meter gives pyloudnorm's loudness, bit for bit, in bounded memory."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pyloudnorm
import pytest

from multitalk_worker.pipeline import loudness


def signals(n: int, seed: int) -> dict[str, np.ndarray]:
    noise = (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)
    gated = noise.copy()
    gated[: n // 3] = 0.0  # below the absolute gate
    gated[-n // 4 :] *= 1e-3  # below the relative gate
    quiet = noise * np.float32(1e-4)
    return {"noise": noise, "quiet": quiet, "gated": gated, "silence": np.zeros(n, np.float32)}


@pytest.mark.parametrize("n", [6400, 6401, 65536, 65537, 16000 * 7 + 123, 300_001])
@pytest.mark.parametrize("chunk", [6400, 7001, 1 << 16])
def test_same_loudness_as_pyloudnorm(monkeypatch: pytest.MonkeyPatch, n: int, chunk: int) -> None:
    monkeypatch.setattr(loudness, "CHUNK", chunk)
    for name, signal in signals(n, seed=n).items():
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = pyloudnorm.Meter(16000).integrated_loudness(signal)
        got = loudness.integrated_loudness(signal, 16000)
        assert got == expected or (np.isinf(got) and np.isinf(expected) and got < 0), (name, got, expected)


def test_memory_is_one_chunk_not_the_track() -> None:
    """The meter never holds a filtered copy of the whole track: its largest array is one chunk plus
    one gating block (tracemalloc sees numpy's allocations)."""
    signal = (np.random.default_rng(0).standard_normal(16000 * 120) * 0.1).astype(np.float32)
    tracemalloc.start()
    loudness.integrated_loudness(signal, 16000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * (loudness.CHUNK + 6400) * 8, peak  # a few float64 chunks, against 15 MB per copy


def test_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(TypeError, match="float32 mono"):
        loudness.integrated_loudness(np.zeros(16000), 16000)
    with pytest.raises(ValueError, match="shorter than one 0.4 s gating block"):
        loudness.integrated_loudness(np.zeros(6399, np.float32), 16000)
