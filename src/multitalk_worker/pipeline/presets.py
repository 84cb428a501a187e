"""Named sampling presets with the reference's recipes (spec 1.2, README of MeiGen-AI/MultiTalk).

`fusionx` and `lightx2v` are the few-step recipes of the FusioniX and lightx2v distillation LoRAs: they
only give good videos with that LoRA merged into the DiT (LoRA loading comes with the GPU work). Without
it they are still valid sampling settings, just of lower quality.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.request import SamplingParams


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    text_guidance: float
    audio_guidance: float
    shift_480p: float
    shift_720p: float
    needs_lora: bool

    def shift(self, resolution: str) -> float:
        """The 720p shift at 720p, the 480p shift otherwise (480p and the tiny test buckets)."""
        return self.shift_720p if resolution == "720p" else self.shift_480p


_LIGHTX2V = Preset(
    "lightx2v",
    steps=4,
    text_guidance=1.0,
    audio_guidance=2.0,
    shift_480p=2.0,
    shift_720p=2.0,
    needs_lora=True,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "default",
            steps=40,
            text_guidance=5.0,
            audio_guidance=4.0,
            shift_480p=7.0,
            shift_720p=11.0,
            needs_lora=False,
        ),
        Preset(
            "fusionx",
            steps=8,
            text_guidance=1.0,
            audio_guidance=2.0,
            shift_480p=2.0,
            shift_720p=2.0,
            needs_lora=True,
        ),
        _LIGHTX2V,
        # The service's few-step choice: lightx2v's 4-step recipe (8 DiT passes per clip); pair it with
        # MULTITALK_LORAS=<lightx2v file> and MULTITALK_ENGINE=fast (bench/RESULTS.md has its clip time).
        replace(_LIGHTX2V, name="fast"),
        # LongCat-Video-Avatar (spec longcat-avatar-inference.md §1.4, §7.1): 1.5's DMD-distilled 8 steps
        # without guidance (the reference forces both scales to 1), and the reference's 50 guided steps at
        # each version's shift.
        Preset("longcat-distill", 8, 1.0, 1.0, 7.0, 7.0, needs_lora=False),
        Preset("longcat-1.5", 50, 4.0, 4.0, 7.0, 7.0, needs_lora=False),
        Preset("longcat-1.0", 50, 4.0, 4.0, 12.0, 12.0, needs_lora=False),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInput(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}") from None


def default_shift(resolution: str) -> float:
    """Shift of the plain model: 11 at 720p, 7 otherwise (480p and the tiny test buckets)."""
    return PRESETS["default"].shift(resolution)


def apply_preset(name: str, resolution: str, base: SamplingParams | None = None) -> SamplingParams:
    """`base` (seed, TeaCache, APG, colour correction) with the preset's steps, guidance and shift."""
    preset = get_preset(name)
    return replace(
        base or SamplingParams(),
        steps=preset.steps,
        text_guidance=preset.text_guidance,
        audio_guidance=preset.audio_guidance,
        shift=preset.shift(resolution),
    )
