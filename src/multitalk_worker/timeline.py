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


def check_length(
    limit_s: float,
    *,
    requested_s: float | None = None,
    media_s: float | None = None,
    what: str = "the audio",
    slack_s: float = 0.0,
    source: str = "",
    remedy: str = "",
    complete: bool = True,
) -> None:
    """The length rule, the one place it lives; `limit_s` is the model's (its registry entry's frames, lowered
    by the worker's setting: schema.JobLimits). Called wherever a length becomes known: the requested one when
    a job is parsed, a container's declared one when an input is fetched, the decoded one after decoding.

    A requested length (max_duration_s) must be within the limit; the media may then be longer (its start is
    used). Without one, the media (`what`, `media_s` seconds) sets the length and must be within the limit:
    longer media is DurationTooLong, never cut silently. `slack_s`: how far a declared length may be off the
    decoded one. `source`: where the limit comes from (a setting), named in the message. `remedy`: what to
    do instead (default: set max_duration_s or send shorter audio). `complete=False`: `media_s` is a lower
    bound (a decode counted frames up to just past the limit and stopped; the message says "at least").
    """
    where = f" ({source})" if source else ""
    if requested_s is not None:
        if requested_s > limit_s + 1e-9:
            raise DurationTooLong(
                f"max_duration_s={requested_s:g} exceeds the limit of {limit_s:g} s{where}; "
                f"ask for at most {limit_s:g}"
            )
        return
    if media_s is not None and media_s > limit_s + slack_s + 1e-9:
        least = "" if complete else "at least "
        raise DurationTooLong(
            f"{what} lasts {least}{media_s:.1f} s; videos are at most {limit_s:g} s{where}. "
            + (remedy or f"Set max_duration_s (<= {limit_s:g}) to use its first part, or send shorter audio")
        )


def resolve_max_frames(
    max_duration_s: float | None, audio_s: float, limit_frames: int, fps: int = FPS
) -> int:
    """The frames a job may make: with `max_duration_s`, its frames (at most `limit_frames`); without it, the
    whole audio (`audio_s`, prepared or declared), which must then fit within `limit_frames` (check_length).
    """
    check_length(duration_limit_s(limit_frames, fps), requested_s=max_duration_s, media_s=audio_s)
    if max_duration_s is None:
        return limit_frames
    return frames_for_duration(max_duration_s, fps)
