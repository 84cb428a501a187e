"""Per-clip conditioning: what each model puts into `y`, the CLIP tokens and the first latent frames.

The clip loop (pipeline/pipeline.py) is the same for every model; a `ClipConditioner` decides, for each
clip, the `ClipConditions` (spec MT 3.3-3.4, IT 5.2) and gives the colour reference. The loop hands it
the previous clip's decoded, colour-corrected video.

| | MultiTalk clip k >= 1 | InfiniteTalk clip 0 | InfiniteTalk clip k >= 1 |
|---|---|---|---|
| `y` pixels | last 25 frames + 56 zeros | source frame 0 + 80 zeros | source frame 72k + 80 zeros |
| mask ones on latent frames | 0-6 | 0 | 0 |
| CLIP input | last generated frame | source frame 0 | source frame 72k |
| first latent frames of `x` | `y` latent (bf16) noised | VAE(frame 0), clean | VAE(last 9), clean |
| colour reference | the image | source frame 0 | source frame 0 |

MultiTalk's clip 0 is the first row's rule with 1 known frame (the image) and no latent written.
InfiniteTalk still draws MultiTalk's motion noise on clips k >= 1 (and overwrites it with the clean latent):
the draws keep the next clip's noise identical to the reference's (spec IT 5.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import AutoencoderKLWan
from torch import Tensor
from transformers import CLIPVisionModel

from multitalk_worker.models.image_encoder import encode_image
from multitalk_worker.models.vae import vae_encode
from multitalk_worker.pipeline import image as image_prep
from multitalk_worker.pipeline.request import ColorReference
from multitalk_worker.pipeline.sampling import ClipConditions, PassInputs, guidance_passes
from multitalk_worker.pipeline.video import SourceFrames
from multitalk_worker.timeline import FRAMES_PER_CLIP, VAE_STRIDE, latent_frames


@dataclass(frozen=True)
class Encoders:
    """The networks a conditioner runs, and where: the DiT's dtype for `y` and the CLIP tokens."""

    vae: AutoencoderKLWan
    image_encoder: CLIPVisionModel
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class SharedInputs:
    """What every clip of a request shares: the text contexts, the person masks and the pass list."""

    context: Tensor  # [1, Lp, text_dim]
    context_null: Tensor  # [1, Ln, text_dim]
    person_masks: Tensor  # [3, h, w]
    text_scale: float

    def passes(self, audio: Tensor) -> dict[str, PassInputs]:
        """Spec MT 6.3: the inputs of each guidance pass; "no audio" is one all-zero person (MT 5.9)."""
        silent = torch.zeros_like(audio[:, -1:])
        inputs = {
            "cond": PassInputs(self.context, audio),
            "drop_text": PassInputs(self.context_null, audio),
            "uncond": PassInputs(self.context_null, silent),
            "drop_audio": PassInputs(self.context, silent),
        }
        return {label: inputs[label] for label in guidance_passes(self.text_scale)}


@dataclass(frozen=True)
class RequestInputs:
    """What a conditioner is built from: the request's source and shared inputs, and the networks."""

    first: Tensor  # source frame 0 (the image) at the bucket, [1, 3, 1, H, W] in [-1, 1], on the device
    source: SourceFrames
    resolution: str
    encoders: Encoders
    shared: SharedInputs
    motion_frames: int
    color: ColorReference


@dataclass(frozen=True)
class ClipInputs:
    """What the loop knows of one clip."""

    index: int
    start: int  # first frame on the 25 fps timeline
    audio: Tensor  # [1, P, F, 5, layers, C] on the device
    previous: Tensor | None  # the previous clip, decoded and colour-corrected [3, F, H, W]; None first


class ClipConditioner(Protocol):
    motion_frames: int  # M: frames of the previous clip each later clip re-renders (and drops)

    def color_reference(self, clip: ClipInputs) -> Tensor:
        """[3, H, W] in [-1, 1]: the frame whose colours the clip is corrected towards."""
        ...

    def conditions(self, clip: ClipInputs) -> ClipConditions: ...

    def state(self) -> dict[str, Tensor]:
        """What a resumed job's conditioner needs from the clips before (pipeline/checkpoint.py)."""
        ...

    def restore(self, state: dict[str, Tensor]) -> None: ...


def known_frames_mask(known: int, latent_hw: tuple[int, int]) -> Tensor:
    """Spec MT 3.4 step 3: ones on the first `known` of F frames, frame 0 repeated 4 times, folded into
    4 channels -> [1, 4, T, h, w] float32."""
    mask = torch.ones(1, FRAMES_PER_CLIP, *latent_hw)
    mask[:, known:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(VAE_STRIDE[0], dim=1), mask[:, 1:]], dim=1)
    return mask.view(1, mask.shape[1] // VAE_STRIDE[0], VAE_STRIDE[0], *latent_hw).transpose(1, 2)


def _y_and_clip(encoders: Encoders, known_pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VAE latent of the known frames followed by zeros (float32 and in the DiT's dtype), and the CLIP
    tokens of the last known frame (spec MT 3.3-3.4)."""
    known, (height, width) = known_pixels.shape[2], known_pixels.shape[-2:]
    zeros = torch.zeros(1, 3, FRAMES_PER_CLIP - known, height, width, device=encoders.device)
    latent = vae_encode(encoders.vae, torch.cat([known_pixels, zeros], dim=2))  # [1, 16, T, h, w]
    clip_fea = encode_image(encoders.image_encoder, known_pixels[:, :, -1]).to(encoders.dtype)
    return latent, latent.to(encoders.dtype), clip_fea


class MultiTalkConditioner:
    """Spec MT 6.6: clip 0 knows the image; every later clip knows the previous clip's last M frames."""

    def __init__(self, inputs: RequestInputs) -> None:
        self.image = inputs.first
        self.encoders = inputs.encoders
        self.shared = inputs.shared
        self.motion_frames = inputs.motion_frames

    def color_reference(self, clip: ClipInputs) -> Tensor:
        return self.image[0, :, 0]

    def state(self) -> dict[str, Tensor]:
        return {}  # the image and the previous clip's frames (the loop's) are all it needs

    def restore(self, state: dict[str, Tensor]) -> None:
        pass

    def conditions(self, clip: ClipInputs) -> ClipConditions:
        if clip.previous is None:
            known_pixels = self.image
        else:
            known_pixels = clip.previous[None, :, -self.motion_frames :].float()
        known = known_pixels.shape[2]
        _, y_latent, clip_fea = _y_and_clip(self.encoders, known_pixels)
        mask = known_frames_mask(known, y_latent.shape[-2:]).to(self.encoders.device, self.encoders.dtype)
        motion = None if clip.previous is None else y_latent[:, :, : latent_frames(known)].float()
        return ClipConditions(
            passes=self.shared.passes(clip.audio),
            clip_fea=clip_fea,
            y=torch.cat([mask, y_latent], dim=1),
            person_masks=self.shared.person_masks,
            motion_latent=motion,
        )


class InfiniteTalkConditioner:
    """Spec IT 5.2-5.4: every clip knows one reference frame of the source (frame `start`, the image for
    an image source); the first latent frames are the clean VAE latent of the frame(s) the clip continues
    from: the reference frame in clip 0, the previous clip's last M colour-corrected frames later."""

    def __init__(self, inputs: RequestInputs) -> None:
        self.source = inputs.source
        self.first = inputs.first
        self.resolution = inputs.resolution
        self.encoders = inputs.encoders
        self.shared = inputs.shared
        self.motion_frames = inputs.motion_frames
        self.color = inputs.color
        self._first: Tensor | None = None  # source frame 0, the colour reference
        self._cached: tuple[Tensor, Tensor, Tensor] | None = None  # (pixels, y, clip tokens) of the last clip
        self._cached_start: int | None = None  # the timeline frame they were made from

    def reference_pixels(self, start: int) -> Tensor:
        """The clip's reference frame resized and cropped to the bucket (spec MT 3.2) [1, 3, 1, H, W]; for
        an image, frame 0 as prepare_inputs prepared it."""
        if self.source.still:
            return self.first
        prepared = image_prep.prepare_image(self.source.frame(start), self.resolution)
        return prepared.pixels.to(self.encoders.device)

    def color_reference(self, clip: ClipInputs) -> Tensor:
        if self.color == "clip":
            return self._reference(clip.start)[0][0, :, 0]
        if self._first is None:
            self._first = self.reference_pixels(0)[0, :, 0]
        return self._first

    def state(self) -> dict[str, Tensor]:
        """Source frame 0, the colour reference: a resumed clip cannot read back to it from a video."""
        return {} if self._first is None else {"first": self._first}

    def restore(self, state: dict[str, Tensor]) -> None:
        if "first" in state:
            self._first = state["first"].to(self.encoders.device)

    def _reference(self, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Pixels, `y` latent part and CLIP tokens of the clip's reference frame; computed again only when
        the frame changes (an image, or a held last frame, gives the same for every clip: spec IT 5.9); the
        same clip asking again (its colour reference) reads nothing."""
        if self._cached is not None and self._cached_start == start:
            return self._cached
        pixels = self.reference_pixels(start)
        self._cached_start = start
        if self._cached is not None and torch.equal(self._cached[0], pixels):
            return self._cached
        _, y_latent, clip_fea = _y_and_clip(self.encoders, pixels)
        self._cached = (pixels, y_latent, clip_fea)
        if start == 0 and self._first is None:
            self._first = pixels[0, :, 0]
        return self._cached

    def conditions(self, clip: ClipInputs) -> ClipConditions:
        pixels, y_latent, clip_fea = self._reference(clip.start)
        if clip.previous is None:  # clip 0 continues from the reference frame itself
            clean = vae_encode(self.encoders.vae, pixels)  # [1, 16, 1, h, w] float32
        else:
            clean = vae_encode(self.encoders.vae, clip.previous[None, :, -self.motion_frames :].float())
        mask = known_frames_mask(1, y_latent.shape[-2:]).to(self.encoders.device, self.encoders.dtype)
        return ClipConditions(
            passes=self.shared.passes(clip.audio),
            clip_fea=clip_fea,
            y=torch.cat([mask, y_latent], dim=1),
            person_masks=self.shared.person_masks,
            motion_latent=None if clip.previous is None else clean,
            clean_latent=clean,
        )


# One conditioner per registry model (tests/test_registry.py checks that each model has one).
CONDITIONERS: dict[str, Callable[[RequestInputs], ClipConditioner]] = {
    "multitalk": MultiTalkConditioner,
    "infinitetalk": InfiniteTalkConditioner,
}
