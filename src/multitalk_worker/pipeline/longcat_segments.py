"""LongCat-Video-Avatar's long-video segments and its length rules (spec longcat-avatar-inference.md §3.7,
§4.5, §7.6, §7.7).

A video is made of 93-frame segments (24 latents). Segment 0 starts at frame 0; segment k >= 1 starts 80
frames after the previous one and re-uses the previous segment's last 13 frames (4 latents) as its clean
condition, keeps its frames 13...92 and adds the first segment's latent 0 as a reference latent placed at
the RoPE time `ref_img_index`. Noisy latents whose RoPE time lies within `mask_frame_range` of it do not
attend to the reference (the masked band; none when the band leaves the 20 noisy latents). S segments make
`93 + 80·(S − 1)` frames.

Length. The reference always renders whole segments (`--num_segments`) and cuts nothing; ours follows the
audio as the other models do: the fewest segments that cover the audio's frames, the video trimmed to
them (`"audio"`). `"whole_segments"` keeps the reference's whole last segment (the audio past its end is
silence, §4.7).

Audio feature indices (§4.5): segment k's frame f is driven by features `clamp(k_a·(80k + f) + w − 2)`,
w = 0...4, with `k_a` features per video frame (1 in v1.5 at 25 Hz, 2 in v1.0 at 32 Hz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from multitalk_worker.errors import InvalidInput

SEGMENT_FRAMES = 93  # F
COND_FRAMES = 13  # Fc
ADVANCE = SEGMENT_FRAMES - COND_FRAMES  # A = 80
TEMPORAL_STRIDE = 4
SEGMENT_LATENTS = (SEGMENT_FRAMES - 1) // TEMPORAL_STRIDE + 1  # T = 24
COND_LATENTS = (COND_FRAMES - 1) // TEMPORAL_STRIDE + 1  # Tc = 4
NOISY_LATENTS = SEGMENT_LATENTS - COND_LATENTS  # 20 in a continuation
REF_IMG_INDEX = 10  # the reference's defaults
MASK_FRAME_RANGE = 3
WINDOW_OFFSETS = (-2, -1, 0, 1, 2)  # feature slots around a frame's centre

SegmentLength = Literal["audio", "whole_segments"]


@dataclass(frozen=True)
class Segment:
    """One segment of the plan. Frames are on the output timeline."""

    index: int
    start: int  # first frame of the segment
    kept: tuple[int, int]  # segment-local frames [first, last) the video keeps
    cond_frames: int  # frames of the previous segment carried in as the condition (0 for the first)
    masked_band: tuple[int, int] | None  # noisy latents [first, last) hidden from the reference

    @property
    def continuation(self) -> bool:
        return self.index > 0


@dataclass(frozen=True)
class SegmentPlan:
    segments: tuple[Segment, ...]
    output_frames: int
    rendered_frames: int  # 93 + 80·(S − 1)
    ref_img_index: int
    mask_frame_range: int


def segments_for(frames: int) -> int:
    """The fewest segments whose `93 + 80·(S − 1)` frames cover `frames` (§7.7)."""
    if frames < 1:
        raise InvalidInput(f"{frames} frames requested; at least one is needed")
    return max(1, math.ceil((frames - SEGMENT_FRAMES) / ADVANCE) + 1)


def rendered_frames(segments: int) -> int:
    return SEGMENT_FRAMES + ADVANCE * (segments - 1)


def masked_band(ref_img_index: int, mask_frame_range: int) -> tuple[int, int] | None:
    """Noisy latents [first, last) of a continuation that do not see the reference latent (§3.7): those
    whose RoPE time (4...23) lies within `mask_frame_range` of `ref_img_index`; None when the band is empty
    or does not lie wholly inside the 20 noisy latents (the reference then masks nothing)."""
    if mask_frame_range <= 0:
        return None
    first = ref_img_index - mask_frame_range - COND_LATENTS
    last = ref_img_index + mask_frame_range - COND_LATENTS + 1
    if first >= 0 and last > first and last <= NOISY_LATENTS:
        return first, last
    return None


def plan_segments(
    audio_frames: int,
    max_frames: int,
    rule: SegmentLength = "audio",
    ref_img_index: int = REF_IMG_INDEX,
    mask_frame_range: int = MASK_FRAME_RANGE,
) -> SegmentPlan:
    """The segments of a video driven by `audio_frames` frames of audio, at most `max_frames` long.

    "audio": the fewest segments covering `min(audio_frames, max_frames)`, the output trimmed to it;
    "whole_segments": the same segments, every rendered frame kept (the reference's output)."""
    if rule not in ("audio", "whole_segments"):
        raise InvalidInput(f"segment length {rule!r} is not known; use 'audio' or 'whole_segments'")
    wanted = min(audio_frames, max_frames)
    count = segments_for(wanted)
    rendered = rendered_frames(count)
    output = wanted if rule == "audio" else rendered
    band = masked_band(ref_img_index, mask_frame_range)
    segments = []
    for index in range(count):
        start = index * ADVANCE
        first = 0 if index == 0 else COND_FRAMES
        last = min(SEGMENT_FRAMES, output - start)
        segments.append(
            Segment(
                index=index,
                start=start,
                kept=(first, last),
                cond_frames=0 if index == 0 else COND_FRAMES,
                masked_band=None if index == 0 else band,
            )
        )
    return SegmentPlan(tuple(segments), output, rendered, ref_img_index, mask_frame_range)


def window_indices(start_frame: int, frames: int, stride: int, feature_frames: int) -> Tensor:
    """Feature indices `[frames, 5]` (int64) of the per-frame windows from `start_frame` (§4.5): centre
    `stride·(start_frame + f)`, slots −2...+2, clamped to the track's `feature_frames` features."""
    offsets = torch.tensor(WINDOW_OFFSETS)
    begin = stride * start_frame
    centres = torch.arange(begin, begin + stride * frames, stride).unsqueeze(1)
    return torch.clamp(centres + offsets.unsqueeze(0), min=0, max=feature_frames - 1)


def segment_windows(features: list[Tensor], segment: Segment, stride: int) -> Tensor:
    """The windows of one segment for every stream: `[P, 93, 5, groups, C]` float32 (§4.5, §4.6; streams
    in the order person 1, person 2, silent others)."""
    windows = []
    for track in features:
        index = window_indices(segment.start, SEGMENT_FRAMES, stride, track.shape[0])
        windows.append(track[index])
    return torch.stack(windows)
