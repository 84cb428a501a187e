"""LongCat-Video-Avatar's schedules, step, guidance, noise draws and segment plan (spec longcat §7).

Bitwise agreement with the reference's scheduler is checked in tests/test_parity_longcat_audio.py; these
tests pin the documented values and the rules the clip loop relies on."""

from __future__ import annotations

import pytest
import torch

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline import longcat_sampling as ls
from multitalk_worker.pipeline.longcat_segments import (
    masked_band,
    plan_segments,
    rendered_frames,
    segment_windows,
    segments_for,
    window_indices,
)


def test_distilled_schedule_values() -> None:
    """Spec §7.1: the shift-7 distilled sigmas and timesteps, and the bf16 timesteps the DiT embeds."""
    schedule = ls.make_schedule("distill", 8, 7.0)
    expected = [1.0, 0.97997755, 0.95448750, 0.92093611, 0.87478089, 0.80727720, 0.69915766, 0.49799198, 0.0]
    assert torch.allclose(schedule.sigmas, torch.tensor(expected), atol=1e-7)
    assert schedule.model_timesteps.float().tolist() == [1000, 980, 956, 920, 876, 808, 700, 498]
    assert schedule.model_timesteps.dtype == torch.bfloat16


def test_default_schedule_and_enhance_hf() -> None:
    schedule = ls.make_schedule("default", 50, 12.0)
    assert schedule.steps == 50 and schedule.sigmas[-1] == 0
    assert round(float(schedule.timesteps[-1]), 2) == 11.87  # spec §7.1, shift 12
    assert len(set(schedule.model_timesteps.float().tolist())) == 44  # bf16 merges neighbours (§7.2)
    hf = ls.enhance_hf(schedule)
    assert hf.steps == 56
    assert hf.timesteps[-10:].tolist() == [500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert torch.equal(hf.sigmas[:-1], hf.timesteps / 1000)
    assert ls.segment_schedule("default", 50, 7.0, continuation=True).steps == 53
    assert ls.segment_schedule("distill", 8, 7.0, continuation=True).steps == 8


def test_v1_distill_table() -> None:
    raw = ls.raw_sigmas("distill_v1", 50)
    assert raw[0] == 1.0 and abs(raw[-1] - 0.02) < 1e-7 and len(raw) == 50


@pytest.mark.parametrize(
    ("mode", "steps"), [("distill", 4), ("distill_v1", 51), ("default", 0), ("other", 8)]
)
def test_bad_schedules_are_refused(mode: str, steps: int) -> None:
    with pytest.raises(InvalidInput):
        ls.make_schedule(mode, steps, 7.0)  # type: ignore[arg-type]


def test_step_and_guidance() -> None:
    schedule = ls.make_schedule("distill", 8, 7.0)
    latent, velocity = torch.randn(1, 16, 2, 3, 4), torch.randn(1, 16, 2, 3, 4)
    stepped = ls.euler_step(latent, velocity, schedule, 7)  # σ 0.498 -> 0: x + (0 − σ)·(−v)
    assert torch.allclose(stepped, latent + schedule.sigmas[7] * velocity)
    preds = {name: torch.randn(1, 16, 2, 3, 4) for name in ("cond", "drop_text", "uncond")}
    assert ls.guidance_passes(1.0, 1.0) == ("cond",)
    assert torch.equal(ls.combine(preds, 1.0, 1.0), preds["cond"])
    assert ls.guidance_passes(4.0, 1.0) == ("drop_text", "cond", "uncond")
    same = ls.combine(preds, 3.0, 3.0)
    assert torch.allclose(same, preds["uncond"] + 3.0 * (preds["cond"] - preds["uncond"]), atol=1e-5)


def test_model_timestep_zeroes_clean_latents() -> None:
    """float32 as the scheduler holds it; the DiT rounds it to its dtype (bf16: 979.98 -> 980, §7.2)."""
    vector = ls.model_timestep(ls.make_schedule("distill", 8, 7.0), 1, 24, clean=1)
    assert vector.shape == (1, 24) and vector.dtype == torch.float32 and vector[0, 0] == 0
    assert vector[0, 1].item() == pytest.approx(979.97754) and vector[0, 1].to(torch.bfloat16) == 980


def test_noise_draws_one_generator_in_order() -> None:
    """§7.5: segment 0 float32, continuations bfloat16, from one generator; a bf16 draw is the rounded
    float32 draw (on the CPU as on the GPU kernel the spec reads) and advances the generator alike."""
    shape = (16, 24, 4, 6)
    gen = torch.Generator().manual_seed(42)
    first, second = ls.segment_noise(gen, shape, False), ls.segment_noise(gen, shape, True)
    assert first.dtype == torch.float32 and second.dtype == torch.bfloat16 and first.shape == (1, *shape)
    again = torch.Generator().manual_seed(42)
    torch.randn((1, *shape), generator=again)
    assert torch.equal(second, torch.randn((1, *shape), generator=again).to(torch.bfloat16))


def test_segment_counts_and_lengths() -> None:
    assert [segments_for(n) for n in (1, 93, 94, 173, 174)] == [1, 1, 2, 2, 3]
    assert rendered_frames(26) == 2093  # man.mp3 at 25 fps (spec §7.7)
    plan = plan_segments(200, 10_000)
    assert [s.start for s in plan.segments] == [0, 80, 160] and plan.output_frames == 200
    assert [s.kept for s in plan.segments] == [(0, 93), (13, 93), (13, 40)]
    assert plan.rendered_frames == 253 and plan.segments[1].cond_frames == 13
    whole = plan_segments(200, 10_000, "whole_segments")
    assert whole.output_frames == 253 and whole.segments[-1].kept == (13, 93)
    assert plan_segments(500, 120).output_frames == 120  # capped


def test_masked_band() -> None:
    assert masked_band(10, 3) == (3, 10)  # noisy latents 3...9 (spec §3.7)
    assert masked_band(30, 3) is None and masked_band(-10, 3) is None and masked_band(10, 0) is None
    assert masked_band(7, 3) == (0, 7) and masked_band(20, 3) == (13, 20)
    assert plan_segments(200, 200).segments[0].masked_band is None


@pytest.mark.parametrize("stride", [1, 2])
def test_window_indices(stride: int) -> None:
    """§4.5: centre k_a·(80k + f), slots −2...+2, clamped at both ends of the track."""
    index = window_indices(80, 93, stride, 300)
    assert index[0].tolist() == [80 * stride - 2 + i for i in range(5)]
    first = window_indices(0, 93, stride, 300)
    assert first[0].tolist() == [0, 0, 0, 1, 2]
    last = window_indices(160, 93, stride, 200)
    assert int(last.max()) == 199
    features = [torch.arange(300.0)[:, None, None].expand(300, 2, 3) for _ in range(2)]
    windows = segment_windows(features, plan_segments(200, 200).segments[1], stride)
    assert windows.shape == (2, 93, 5, 2, 3) and windows[0, 0, 2, 0, 0] == 80 * stride
