"""The one definition of the video timeline and its rules: frame rate, audio rate, clip geometry, lengths.

The Wan-based models of the registry work on this timeline: 25 fps video driven by 16 kHz audio, 81-frame
clips (F = 4n + 1, 21 latent frames after the VAE's 4x temporal stride). How far a clip advances and how
much of each clip is kept depend on the model's motion frames (registry.ModelSpec.motion_frames). A model
with its own frame rate (registry.ModelSpec.fps: LongCat-Video-Avatar 1.0 runs at 16 fps) passes it to the
length functions (`fps`; the default is the Wan timeline's).
"""

from __future__ import annotations

from multitalk_worker.errors import DurationTooLong, InvalidInput

FPS = 25
SAMPLE_RATE = 16_000
FRAMES_PER_CLIP = 81  # F, must be 4n + 1
VAE_STRIDE = (4, 8, 8)  # time, height, width
LATENT_FRAMES = (FRAMES_PER_CLIP - 1) // VAE_STRIDE[0] + 1  # T = 21
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


def audio_frames(num_samples: int) -> int:
    """`La = int(n / 16000 * 25)`: the 25 fps frames a 16 kHz signal covers, in the reference's float
    arithmetic (truncated)."""
    return int(num_samples / SAMPLE_RATE * FPS)


def latent_frames(frames: int) -> int:
    """Latent frames of `frames` video frames: 1 + (frames - 1) // 4 (the causal VAE's first frame alone)."""
    return 1 + (frames - 1) // VAE_STRIDE[0]


def min_audio_s() -> float:
    """The shortest audio a video can be made from: more than one clip's frames (La > F), 3.28 s."""
    return (FRAMES_PER_CLIP + 1) / FPS


def duration_limit_s(max_frames: int, fps: int = FPS) -> float:
    return max_frames / fps


def frames_for_duration(max_duration_s: float, fps: int = FPS) -> int:
    """Whole frames of `fps` within `max_duration_s` (a hair of float slack, so 3.24 s is 81 frames)."""
    frames = int(max_duration_s * fps + 1e-6)
    if frames < 1:
        raise InvalidInput(f"max_duration_s={max_duration_s:g} is shorter than one frame ({1 / fps:g} s)")
    return frames


def resolve_max_frames(
    max_duration_s: float | None, audio_s: float, limit_frames: int, fps: int = FPS
) -> int:
    """The duration rule, the one place it lives: the frames a job may make.

    With `max_duration_s`, its frames (at most `limit_frames`); without it, the whole audio, which must then
    fit within `limit_frames`: longer audio without a cap is DurationTooLong, never cut silently. `audio_s`
    is the length of the (prepared, or declared) audio.
    """
    limit_s = duration_limit_s(limit_frames, fps)
    if max_duration_s is None:
        if audio_s > limit_s + 1e-9:
            raise DurationTooLong(
                f"audio is {audio_s:.1f} s; videos are at most {limit_s:g} s. "
                f"Set max_duration_s (<= {limit_s:g}) to make a video of the first part, "
                "or send shorter audio"
            )
        return limit_frames
    if max_duration_s > limit_s + 1e-9:
        raise DurationTooLong(f"max_duration_s={max_duration_s:g} exceeds the limit of {limit_s:g} s")
    return frames_for_duration(max_duration_s, fps)
