"""Schedule, solver, guidance, APG, TeaCache, motion injection and RNG order of the sampling loop (spec 6)."""

from __future__ import annotations

import pytest
import torch

from multitalk_worker.errors import Cancelled, InvalidInput
from multitalk_worker.models.configs import TINY
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.pipeline import presets
from multitalk_worker.pipeline.sampling import (
    ClipConditions,
    GuidanceSettings,
    PassInputs,
    apg_direction,
    cfg_combine,
    euler_step,
    guidance_passes,
    initial_noise,
    sample_clip,
    shifted_timesteps,
    teacache_decision,
)

T, H, W = 3, 4, 4  # latent frames and grid of the tiny runs
FRAMES = 4 * (T - 1) + 1


@pytest.mark.parametrize(
    ("steps", "shift", "first", "last"),
    [
        (40, 7, [1000.0, 996.2585, 992.3452, 988.2479], [278.3765, 160.6527, 6.9583, 0.0]),
        (40, 11, [1000.0, 997.6158, 995.1152, 992.4893], [377.4128, 231.2272, 10.8911, 0.0]),
        (8, 2, [1000.0, 923.1597, 833.5277, 727.6197], [445.3081, 251.3115, 1.9980, 0.0]),
        (4, 2, [1000.0, 800.2399, 500.7496, 1.9980], [800.2399, 500.7496, 1.9980, 0.0]),
    ],
)
def test_schedule_matches_spec_vectors(
    steps: int, shift: float, first: list[float], last: list[float]
) -> None:
    t = shifted_timesteps(steps, shift)
    assert t.dtype == torch.float32 and t.shape == (steps + 1,)
    torch.testing.assert_close(t[:4], torch.tensor(first), atol=1e-4, rtol=0)  # 4 decimals, float32 at 1000
    torch.testing.assert_close(t[-4:], torch.tensor(last), atol=1e-4, rtol=0)  # 4 decimals, float32 at 1000


def test_euler_step_moves_against_velocity_by_dt() -> None:
    x, v = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    t = shifted_timesteps(4, 2)
    out = euler_step(x, v, t[1], t[2])
    torch.testing.assert_close(out, x - v * (t[1] - t[2]) / 1000)


def test_guidance_pass_count_follows_text_scale() -> None:
    assert guidance_passes(5.0) == ("cond", "drop_text", "uncond")
    assert guidance_passes(1.0) == ("cond", "drop_audio")
    assert guidance_passes(1.0 + 1e-12) == ("cond", "drop_audio")  # math.isclose


def test_cfg_formulas() -> None:
    cond, drop_text, uncond = torch.randn(3, 8).unbind(0)
    three = cfg_combine({"cond": cond, "drop_text": drop_text, "uncond": uncond}, 5.0, 4.0)
    torch.testing.assert_close(three, uncond + 5.0 * (cond - drop_text) + 4.0 * (drop_text - uncond))
    two = cfg_combine({"cond": cond, "drop_audio": uncond}, 1.0, 2.0)
    torch.testing.assert_close(two, uncond + 2.0 * (cond - uncond))


def test_apg_is_orthogonal_clamped_and_uses_momentum() -> None:
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 16, 2, 4, 4, generator=gen)
    diff = 100 * torch.randn(1, 16, 2, 4, 4, generator=gen)  # norm far above the threshold 55
    out, running = apg_direction(diff, cond, None, momentum=-0.75, norm_threshold=55.0)
    assert torch.equal(running, diff)
    assert abs(float((out.double() * cond.double()).sum())) < 1e-6 * float(out.norm() * cond.norm())
    assert float(out.norm()) <= 55.0 + 1e-3
    # second step: the running average is diff2 + momentum * diff1
    diff2 = torch.randn(1, 16, 2, 4, 4, generator=gen)
    _, running2 = apg_direction(diff2, cond, running, momentum=-0.75, norm_threshold=55.0)
    torch.testing.assert_close(running2, diff2 + -0.75 * diff)
    # below the threshold and orthogonal to cond already: unchanged
    ortho = torch.zeros_like(cond)
    ortho[0, 0, 0, 0, 0], cond2 = 1.0, torch.zeros_like(cond)
    cond2[0, 1, 0, 0, 0] = 1.0
    same, _ = apg_direction(ortho, cond2, None, momentum=-0.75, norm_threshold=55.0)
    torch.testing.assert_close(same, ortho)


def test_teacache_skip_pattern() -> None:
    """Forced computes for the first 5 steps; then skip while the accumulated rescaled change < threshold."""
    settings = GuidanceSettings(
        steps=14,
        shift=7,
        text_scale=5,
        audio_scale=4,
        teacache_threshold=0.25,
        teacache_coefficients=(1.0, 0.0),
    )  # poly(r) = r
    accumulated, previous, e0, pattern = 0.0, None, torch.ones(1, 6, 4), []
    for step in range(settings.steps):
        e0 = e0 * 1.1  # relative L1 change 0.1 per step
        compute, accumulated = teacache_decision(accumulated, previous, e0, step, settings)
        previous = e0
        pattern.append(compute)
    expected = [True] * 5 + [False, False, True] * 3
    assert pattern == expected


@pytest.fixture(scope="module")
def tiny_model() -> MultiTalkTransformer:
    torch.manual_seed(0)
    return MultiTalkTransformer(TINY.dit).eval()


def _conditions(passes: tuple[str, ...], motion: torch.Tensor | None = None) -> ClipConditions:
    gen = torch.Generator().manual_seed(1)
    cfg = TINY.dit
    audio = torch.randn(1, 1, FRAMES, 5, cfg.audio_layers, cfg.audio_channels, generator=gen)
    prompt, negative = (
        torch.randn(1, 6, cfg.text_dim, generator=gen),
        torch.randn(1, 9, cfg.text_dim, generator=gen),
    )
    inputs = {
        "cond": PassInputs(prompt, audio),
        "drop_text": PassInputs(negative, audio),
        "uncond": PassInputs(negative, torch.zeros_like(audio)),
        "drop_audio": PassInputs(prompt, torch.zeros_like(audio)),
    }
    return ClipConditions(
        passes={k: inputs[k] for k in passes},
        clip_fea=torch.randn(1, 5, cfg.image_dim, generator=gen),
        y=torch.randn(1, 20, T, H, W, generator=gen),
        person_masks=torch.ones(3, H, W),
        motion_latent=motion,
    )


def _count_block_calls(model: MultiTalkTransformer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = model.run_blocks

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "run_blocks", counting)
    return calls


@pytest.mark.parametrize(("text_scale", "passes"), [(5.0, 3), (1.0, 2)])
def test_teacache_skips_whole_steps_with_per_pass_residuals(
    tiny_model: MultiTalkTransformer, monkeypatch: pytest.MonkeyPatch, text_scale: float, passes: int
) -> None:
    settings = GuidanceSettings(
        steps=8, shift=7, text_scale=text_scale, audio_scale=4.0, teacache_threshold=1e9
    )
    calls = _count_block_calls(tiny_model, monkeypatch)
    conditions = _conditions(guidance_passes(text_scale))
    with torch.no_grad():
        out = sample_clip(tiny_model, torch.randn(1, 16, T, H, W), conditions, settings, torch.Generator())
    assert calls[0] == 5 * passes  # only the 5 forced steps run the blocks
    assert torch.isfinite(out).all()


def test_teacache_off_and_zero_threshold_match(tiny_model: MultiTalkTransformer) -> None:
    noise = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(3))
    conditions = _conditions(guidance_passes(5.0))
    base = GuidanceSettings(steps=6, shift=7, text_scale=5.0, audio_scale=4.0)
    with torch.no_grad():
        plain = sample_clip(tiny_model, noise, conditions, base, torch.Generator())
        zero = GuidanceSettings(**{**base.__dict__, "teacache_threshold": 0.0})
        cached = sample_clip(tiny_model, noise, conditions, zero, torch.Generator())
    torch.testing.assert_close(plain, cached, rtol=0, atol=0)


def test_motion_injection_and_rng_draw_order(tiny_model: MultiTalkTransformer) -> None:
    """Later clip: main noise, then steps+1 motion-noise draws; the motion frames end exactly restored."""
    steps, tm = 4, 2
    motion = torch.randn(1, 16, tm, H, W, generator=torch.Generator().manual_seed(5))
    settings = GuidanceSettings(steps=steps, shift=2, text_scale=1.0, audio_scale=2.0)
    generator = torch.Generator().manual_seed(42)
    noise = initial_noise(generator, (16, T, H, W))
    with torch.no_grad():
        out = sample_clip(tiny_model, noise, _conditions(guidance_passes(1.0), motion), settings, generator)
    assert torch.equal(out[:, :, :tm], motion)  # σ = 0 after the last step

    replay = torch.Generator().manual_seed(42)
    assert torch.equal(torch.randn(16, T, H, W, generator=replay)[None], noise)
    for _ in range(steps + 1):
        torch.randn(16, tm, H, W, generator=replay)
    assert torch.equal(replay.get_state(), generator.get_state())


def test_progress_and_cancel_between_steps(tiny_model: MultiTalkTransformer) -> None:
    settings = GuidanceSettings(steps=5, shift=2, text_scale=1.0, audio_scale=2.0)
    seen: list[int] = []
    with torch.no_grad():
        sample_clip(
            tiny_model,
            torch.randn(1, 16, T, H, W),
            _conditions(guidance_passes(1.0)),
            settings,
            torch.Generator(),
            on_step=seen.append,
        )
        assert seen == [1, 2, 3, 4, 5]
        seen.clear()
        with pytest.raises(Cancelled, match="before step 3 of 5"):
            sample_clip(
                tiny_model,
                torch.randn(1, 16, T, H, W),
                _conditions(guidance_passes(1.0)),
                settings,
                torch.Generator(),
                on_step=seen.append,
                cancel=lambda: len(seen) >= 2,
            )
    assert seen == [1, 2]


def test_apg_sampling_runs_and_differs_from_cfg(tiny_model: MultiTalkTransformer) -> None:
    noise = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(3))
    conditions = _conditions(guidance_passes(5.0))
    cfg = GuidanceSettings(steps=3, shift=7, text_scale=5.0, audio_scale=4.0)
    apg = GuidanceSettings(steps=3, shift=7, text_scale=5.0, audio_scale=4.0, apg=True)
    with torch.no_grad():
        a = sample_clip(tiny_model, noise, conditions, cfg, torch.Generator())
        b = sample_clip(tiny_model, noise, conditions, apg, torch.Generator())
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_presets_hold_the_reference_recipes() -> None:
    default = presets.apply_preset("default", "480p")
    assert (default.steps, default.text_guidance, default.audio_guidance, default.shift) == (
        40,
        5.0,
        4.0,
        7.0,
    )
    assert presets.apply_preset("default", "720p").shift == 11.0
    fusionx = presets.apply_preset("fusionx", "720p")
    assert (fusionx.steps, fusionx.text_guidance, fusionx.audio_guidance, fusionx.shift) == (8, 1.0, 2.0, 2.0)
    light = presets.apply_preset("lightx2v", "480p")
    assert (light.steps, light.text_guidance, light.audio_guidance, light.shift) == (4, 1.0, 2.0, 2.0)
    assert presets.PRESETS["fusionx"].needs_lora and not presets.PRESETS["default"].needs_lora
    with pytest.raises(InvalidInput, match="accepted: default, fusionx, lightx2v, fast"):
        presets.get_preset("turbo")
