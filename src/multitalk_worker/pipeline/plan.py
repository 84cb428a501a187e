"""Where each clip starts on the 25 fps timeline and how many frames the video keeps (spec MT 6.6, IT 5.5).

Both models stream the same way: clip 0 covers frames [0, F); every later clip starts F − M frames on and
re-renders the previous clip's last M frames, until a clip ends at or beyond min(max_frames, La). They
differ in the final length: MultiTalk drops the last clip's reflection padding (`La − 3` for audio of `La`
frames), InfiniteTalk keeps exactly the audio's frames (`min(La, max_frames)`). When the request caps the
video at <= F frames, one clip is made (the references' clip mode) and cut to the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from multitalk_worker.registry import LengthRule
from multitalk_worker.timeline import FRAMES_PER_CLIP


@dataclass(frozen=True)
class ClipPlan:
    """`starts` lists only clips with at least one kept frame: when the reference's last clip would be cut
    away entirely (e.g. MultiTalk audio of 82-84 frames: 79-81 output frames, all from clip 0), it is not
    made. The output is identical, since a clip never affects the clips before it. `padded_clip` is the
    index of the reference's last clip, the one that sees reflection-padded audio (None in clip mode)."""

    starts: tuple[int, ...]
    max_frames: int
    output_frames: int
    padded_clip: int | None
    motion_frames: int

    @property
    def streaming(self) -> bool:
        return self.max_frames > FRAMES_PER_CLIP

    def kept(self, index: int) -> tuple[int, int]:
        """Frames [first, last) of clip `index` (clip-local) that the video keeps."""
        first = 0 if index == 0 else self.motion_frames
        start = self.starts[index] + first
        return first, first + min(FRAMES_PER_CLIP - first, self.output_frames - start)


def plan_clips(audio_frames: int, max_frames: int, motion_frames: int, rule: LengthRule) -> ClipPlan:
    """The references' frame counting: clip starts advance by F − M until a clip ends at or beyond
    min(max_frames, La); the output is cut to max_frames, then by the length rule."""
    if max_frames <= FRAMES_PER_CLIP:  # clip mode: one clip, cut to max_frames
        return ClipPlan((0,), max_frames, max_frames, None, motion_frames)
    advance = FRAMES_PER_CLIP - motion_frames
    starts = [0, advance]
    while starts[-1] + FRAMES_PER_CLIP < min(max_frames, audio_frames):
        starts.append(starts[-1] + advance)
    generated = FRAMES_PER_CLIP + (len(starts) - 1) * advance
    end = starts[-1] + FRAMES_PER_CLIP
    miss = end - audio_frames + 3 if end >= audio_frames else 0
    if rule == "drop_padding":
        output = min(generated, max_frames) - miss
    else:  # the last clip ran past the audio: cut to the audio's own length
        output = min(generated, max_frames, audio_frames if miss else generated)
    needed = tuple(s for i, s in enumerate(starts) if i == 0 or s + motion_frames < output)
    return ClipPlan(needed, max_frames, output, len(starts) - 1, motion_frames)
