"""Lab colour correction towards the reference image (spec 6.7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import color

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.color import match_colors


def _lab_stats(frame_m1_1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    lab = color.rgb2lab(((frame_m1_1.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
    return lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)


def test_full_strength_moves_lab_statistics_to_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 16, 16, generator=gen) * 0.6 - 0.3  # mid-range colours
    video = (reference[:, None] * 0.5 + torch.tensor([0.3, -0.2, 0.1])[:, None, None, None]).repeat(
        1, 3, 1, 1
    )
    out = match_colors(video, reference, 1.0)
    assert out.shape == video.shape and out.dtype == torch.float32
    ref_mean, ref_std = _lab_stats(reference)
    for frame in range(3):
        mean, std = _lab_stats(out[:, frame])
        np.testing.assert_allclose(mean, ref_mean, atol=0.5)
        np.testing.assert_allclose(std, ref_std, rtol=0.05, atol=0.3)


def test_strength_blends_linearly_and_zero_is_identity() -> None:
    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(3, 8, 8, generator=gen) * 2 - 1
    video = torch.rand(3, 2, 8, 8, generator=gen) * 2 - 1
    assert match_colors(video, reference, 0.0) is video
    full, half = match_colors(video, reference, 1.0), match_colors(video, reference, 0.5)
    torch.testing.assert_close(half, (video + full) / 2, atol=1e-5, rtol=0)


def test_flat_frame_takes_the_reference_mean() -> None:
    reference = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    flat = -torch.ones(3, 1, 8, 8)  # black: Lab exactly (0, 0, 0), std exactly 0 in every channel
    out = match_colors(flat, reference, 1.0)
    mean, _ = _lab_stats(out[:, 0])
    np.testing.assert_allclose(mean, _lab_stats(reference)[0], atol=1.0)


def test_strength_out_of_range_is_rejected() -> None:
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        match_colors(torch.zeros(3, 1, 4, 4), torch.zeros(3, 4, 4), 1.5)
