"""Lab colour correction towards the reference image (spec 6.7)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage import color

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.color import ColorMethod, _transfer, lab_to_rgb, match_colors, rgb_to_lab


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


# --- torch path (CUDA clips) against the scikit-image path (the reference's code) ---

SKIMAGE_FLOAT64_ATOL = 1e-10  # torch (float64) vs scikit-image on float64 input: the same arithmetic
# vs scikit-image on float32 input (what the reference computes): its float32 rounding, measured at
# 3.6e-6 (on [0, 1]) on a real 81-frame 576x704 clip and ~1.3e-5 on noise frames; here on [-1, 1].
SKIMAGE_FLOAT32_ATOL = 5e-5


def _noise_clip(seed: int, frames: int = 3, size: tuple[int, int] = (24, 32)) -> tuple[torch.Tensor, ...]:
    """Frames in [-1.5, 1.3] (clipped by both paths) with a block of black pixels; a mid-range reference."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.rand(3, frames, *size, generator=gen) * 2.8 - 1.5
    video[:, :, :4, :4] = -1.0
    reference = torch.rand(3, *size, generator=gen) * 1.6 - 0.8
    return video, reference


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25])
def test_torch_path_equals_skimage_path(strength: float) -> None:
    video, reference = _noise_clip(3)
    assert video.min() < -1 and video.max() > 1  # out-of-range values reach the clipping
    for dtype, atol in ((torch.float64, SKIMAGE_FLOAT64_ATOL), (torch.float32, SKIMAGE_FLOAT32_ATOL)):
        args = (video.to(dtype), reference.to(dtype), strength)
        fast, ref = match_colors(*args, method="torch"), match_colors(*args, method="skimage")
        assert fast.dtype == dtype and fast.shape == video.shape
        torch.testing.assert_close(fast, ref, atol=atol, rtol=0)
        assert (fast - ref).abs().mean() < atol / 10
    assert (match_colors(video, reference, strength, method="torch") - video).abs().max() > 0.1


def test_lab_conversions_equal_skimage_including_edge_branches() -> None:
    gen = torch.Generator().manual_seed(4)
    rgb = torch.rand(3, 16, 16, generator=gen, dtype=torch.float64)
    rgb[:, 0, :6] = torch.tensor([0.0, 1.0, 0.04045, 0.04045 + 1e-9, 0.0031308, 1e-6], dtype=torch.float64)
    np.testing.assert_allclose(
        rgb_to_lab(rgb).permute(1, 2, 0).numpy(),
        color.rgb2lab(rgb.permute(1, 2, 0).numpy()),
        atol=1e-10,
        rtol=0,
    )
    lab = torch.stack(
        [
            torch.rand(16, 16, generator=gen, dtype=torch.float64) * 130 - 15,  # L < 0 and > 100
            torch.rand(16, 16, generator=gen, dtype=torch.float64) * 400 - 200,
            torch.rand(16, 16, generator=gen, dtype=torch.float64) * 400 - 200,  # large b: Z < 0
        ]
    )
    lab_hwc = lab.permute(1, 2, 0).numpy()
    assert ((lab_hwc[..., 0] + 16) / 116 - lab_hwc[..., 2] / 200 < 0).any()
    with pytest.warns(UserWarning, match="negative Z values"):
        expected = color.lab2rgb(lab_hwc)
    got = lab_to_rgb(lab).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)
    assert got.min() == 0.0 and got.max() == 1.0  # clipped like skimage


@pytest.mark.parametrize("method", ["skimage", "torch"])
def test_black_frame_takes_the_reference_mean_in_both_paths(method: ColorMethod) -> None:
    _, reference = _noise_clip(5)
    ref_lab = color.rgb2lab(((reference.double().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
    flat_colour = color.lab2rgb(ref_lab.reshape(-1, 3).mean(0)[None, None]).reshape(3) * 2 - 1
    out = match_colors(-torch.ones(3, 2, 24, 32, dtype=torch.float64), reference.double(), 1.0, method=method)
    expected = torch.from_numpy(flat_colour)[:, None, None, None].expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_flat_grey_frame_takes_the_reference_mean_in_the_torch_path() -> None:
    """std exactly 0 in torch; the float32 numpy std of a flat grey L channel is rounding noise instead."""
    _, reference = _noise_clip(6)
    ref_lab = color.rgb2lab(((reference.double().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
    flat_colour = color.lab2rgb(ref_lab.reshape(-1, 3).mean(0)[None, None]).reshape(3) * 2 - 1
    out = match_colors(torch.full((3, 1, 24, 32), 0.1), reference, 1.0, method="torch")
    expected = torch.from_numpy(flat_colour).float()[:, None, None, None].expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_torch_path_blends_linearly_and_zero_is_identity() -> None:
    video, reference = _noise_clip(7)
    video = video.clamp(-1, 1)
    assert match_colors(video, reference, 0.0, method="torch") is video
    full, half = (match_colors(video, reference, s, method="torch") for s in (1.0, 0.5))
    torch.testing.assert_close(half, (video + full) / 2, atol=1e-6, rtol=0)


def test_cpu_clips_take_the_skimage_path_and_unknown_methods_are_rejected() -> None:
    video, reference = _noise_clip(8, frames=1)
    assert torch.equal(
        match_colors(video, reference, 1.0), match_colors(video, reference, 1.0, method="skimage")
    )
    with pytest.raises(InvalidInput, match="'skimage' or 'torch'"):
        match_colors(video, reference, 1.0, method="cuda")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_clips_take_the_torch_path_on_the_device() -> None:
    video, reference = _noise_clip(9)
    out = match_colors(video.cuda(), reference.cuda(), 1.0)
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(
        out.cpu(), match_colors(video, reference, 1.0, method="torch"), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        out.cpu(), match_colors(video, reference, 1.0), atol=SKIMAGE_FLOAT32_ATOL, rtol=0
    )


def test_out_of_gamut_lab_is_clipped_in_both_paths_without_a_warning_per_frame() -> None:
    """A warm face on a dark background as the reference: the transfer gives dark pixels a strong b, whose
    Z < 0 scikit-image clips (and warns of); the skimage path clips silently, equal to the torch path."""
    gen = torch.Generator().manual_seed(8)
    reference = torch.full((3, 24, 32), -0.85)
    reference[:, 6:18, 8:24] = torch.tensor([0.72, 0.33, -0.06])[:, None, None]  # skin tone
    video = torch.rand(3, 4, 24, 32, generator=gen, dtype=torch.float64) * 0.6 - 0.3
    frame_lab = color.rgb2lab(((video[:, 0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
    ref_lab = color.rgb2lab(((reference.double().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
    with pytest.warns(UserWarning, match="negative Z values"):  # the condition the reference meets
        color.lab2rgb(_transfer(frame_lab, ref_lab))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = match_colors(video, reference.double(), 1.0, method="skimage")
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(
        out, match_colors(video, reference.double(), 1.0, method="torch"), atol=1e-9, rtol=0
    )
