"""ITU-R BS.1770 integrated loudness of a mono track in bounded memory, with pyloudnorm's numerics.

The reference measures loudness with pyloudnorm's `Meter.integrated_loudness`, which copies the whole signal
and filters it in place: the track twice over in memory, however long it is. pyloudnorm has no streaming
API, so this meter is written here: pyloudnorm's two K-weighting biquads (its own `IIRfilter` coefficients)
run chunk by chunk with their state carried over (`lfilter` with `zi` yields the samples of one whole
call), the filtered samples are stored as float32 as pyloudnorm stores them in its copy of a float32 input,
and each 400 ms gating block's mean square is taken, with pyloudnorm's expressions, from a window that holds
one block as soon as the block is complete. The result is pyloudnorm's float, bit for bit
(tests/test_loudness.py), while memory stays at one chunk.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyloudnorm
import scipy.signal

BLOCK_S = 0.4  # gating block T_g (BS.1770-4)
OVERLAP = 0.75
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the absolutely gated loudness
CHUNK = 1 << 16  # samples filtered at a time


class _Biquad:
    """One pyloudnorm `IIRfilter` stage applied chunk by chunk; its output stored in `store` (the dtype of
    pyloudnorm's copy of the input)."""

    def __init__(self, stage: pyloudnorm.IIRfilter, store: type[np.floating]) -> None:
        self.b, self.a = stage.generate_coefficients()
        self.gain = stage.passband_gain
        self.state = np.zeros(max(len(self.a), len(self.b)) - 1)
        self.store = store

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        out, self.state = scipy.signal.lfilter(self.b, self.a, chunk, zi=self.state)
        return (self.gain * out).astype(self.store, copy=False)


def _k_weighting(rate: int, store: type[np.floating]) -> list[_Biquad]:
    """pyloudnorm's K-weighting filter class: the high shelf, then the high pass."""
    return [
        _Biquad(pyloudnorm.IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, rate, "high_shelf"), store),
        _Biquad(pyloudnorm.IIRfilter(0.0, 0.5, 38.0, rate, "high_pass"), store),
    ]


def _block_bounds(index: int, rate: int) -> tuple[int, int]:
    """Samples [l, u) of gating block `index`, computed as pyloudnorm computes them."""
    step = 1.0 - OVERLAP
    return int(BLOCK_S * (index * step) * rate), int(BLOCK_S * (index * step + 1) * rate)


def _block_powers(signal: np.ndarray, rate: int, store: type[np.floating]) -> np.ndarray:
    """The mean square of the K-weighted signal in each gating block (BS.1770 eq. 1), streamed."""
    n = signal.shape[0]
    blocks = int(np.round((n / rate - BLOCK_S) / (BLOCK_S * (1.0 - OVERLAP)))) + 1
    stages = _k_weighting(rate, store)
    powers = np.zeros(blocks)
    window, start, block = np.zeros(0, store), 0, 0  # window: filtered samples [start, start + len)
    for offset in range(0, n, CHUNK):
        filtered = signal[offset : offset + CHUNK]
        for stage in stages:
            filtered = stage(filtered)
        window = np.concatenate([window, filtered])
        end = offset + filtered.shape[0]
        while block < blocks:
            low, high = _block_bounds(block, rate)
            if high > end and end < n:
                break  # the block is not complete yet (at the end of the signal a block may run past it)
            segment = window[low - start : min(high, end) - start]
            powers[block] = (1.0 / (BLOCK_S * rate)) * np.sum(np.square(segment))
            block += 1
        keep = _block_bounds(block, rate)[0] if block < blocks else end
        window, start = window[keep - start :], keep
    return powers


def integrated_loudness(signal: np.ndarray, rate: int, store: type[np.floating] = np.float32) -> float:
    """Gated loudness in LUFS of a float32 mono `signal` of at least one block (BS.1770-4 eqs. 2-7, as
    pyloudnorm's `Meter(rate).integrated_loudness`); -inf for digital silence. `store=np.float64` gives
    pyloudnorm's value for the same samples held as float64 (it keeps the filtered copy in the input's
    dtype): LongCat's reference measures its zero-padded tracks so."""
    if signal.dtype != np.float32 or signal.ndim != 1:
        raise TypeError(f"a float32 mono signal is measured, got {signal.dtype} {signal.shape}")
    if signal.shape[0] < BLOCK_S * rate:
        raise ValueError(f"the signal is shorter than one {BLOCK_S} s gating block")
    powers = _block_powers(signal, rate, store)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no block above a gate: the mean of nothing
        block_lufs = np.array([-0.691 + 10.0 * np.log10(power) for power in powers])  # scalar log10s
        above = powers[block_lufs >= ABSOLUTE_GATE]
        relative = -0.691 + 10.0 * np.log10(np.mean(above)) + RELATIVE_GATE
        gated = powers[(block_lufs > relative) & (block_lufs > ABSOLUTE_GATE)]
        return float(-0.691 + 10.0 * np.log10(np.nan_to_num(np.mean(gated))))
