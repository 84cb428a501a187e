"""What `validate_only` adds to the plan: the clip plan (clips, frames, DiT passes), the estimated GPU time,
and a PNG of the frame as the model sees it: the image resized and centre-cropped to its bucket, with each
speaker's mask at the model's latent resolution drawn on it (speaker 1 orange, speaker 2 blue).

Everything comes from the job's own input checks (pipeline/inputs.prepare_inputs: bucket, crop, masks, clip
plan), so the preview cannot disagree with the job: what it shows is what the DiT conditions on. For a video
source (InfiniteTalk dubbing) the frame shown is the video's first frame at the bucket.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from multitalk_worker.config import Settings
from multitalk_worker.estimate import engine_key, estimate_gpu_s
from multitalk_worker.pipeline.inputs import PreparedInputs, prepare_inputs
from multitalk_worker.pipeline.request import GenerationRequest
from multitalk_worker.pipeline.sampling import guidance_passes

SPEAKER_COLOURS = ((255, 140, 0), (40, 120, 255))  # RGB of speaker 1 and 2, as on the web page
MASK_ALPHA = 0.35


def plan_details(
    request: GenerationRequest, settings: Settings, *, with_image: bool, inputs: PreparedInputs | None = None
) -> dict[str, Any]:
    """Clip plan, estimate and (with_image) the preview PNG as a data URI, from the job's own input checks
    (pipeline/inputs.prepare_inputs; `inputs`: already prepared by the caller, who closes them)."""
    own = inputs is None
    inputs = inputs or prepare_inputs(request, tiny_model=settings.tiny_sizes)
    try:
        steps = request.sampling.steps
        passes = len(guidance_passes(request.sampling.text_guidance))
        clips = len(inputs.plan.starts)
        details: dict[str, Any] = {
            "clips": clips,
            "frames": inputs.plan.output_frames,
            "passes_per_step": passes,
            "passes": clips * steps * passes,
            "estimate": _estimate(settings, request.resolution, clips, steps, passes),
        }
        if with_image:
            png = preview_png(inputs, len(request.speakers))
            details["preview_png"] = "data:image/png;base64," + base64.b64encode(png).decode()
        return details
    finally:
        if own:
            inputs.close()


def _estimate(settings: Settings, resolution: str, clips: int, steps: int, passes: int) -> dict[str, Any]:
    if settings.tiny_model:
        return {"gpu_s": None, "reason": "the built-in tiny model has no measured timings"}
    return estimate_gpu_s(
        gpu_name=_gpu_name(settings),
        engine=engine_key(settings.engine, settings.fp8),
        resolution=resolution,
        clips=clips,
        steps=steps,
        passes=passes,
    )


def _gpu_name(settings: Settings) -> str | None:
    if settings.device == "cpu" or not torch.cuda.is_available():
        return None
    device = torch.device("cuda" if settings.device == "auto" else settings.device)
    return torch.cuda.get_device_name(device)


def preview_png(inputs: PreparedInputs, persons: int) -> bytes:
    """The bucket frame with each speaker's latent-grid mask tinted and outlined, as PNG bytes."""
    cond, masks = inputs.first, inputs.person_masks  # [1, 3, 1, H, W] in [-1, 1]; [3, h, w] 0/1
    height, width = cond.bucket
    pixels = ((cond.pixels[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    frame = pixels.numpy().astype(np.float32)
    full = F.interpolate(masks[None], size=(height, width), mode="nearest")[0].numpy() > 0
    boxes = []
    for person in range(persons if persons > 1 else 0):
        colour = np.array(SPEAKER_COLOURS[person], np.float32)
        frame[full[person]] = (1 - MASK_ALPHA) * frame[full[person]] + MASK_ALPHA * colour
        rows, cols = np.nonzero(full[person])
        boxes.append((int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())))
    image = Image.fromarray(frame.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for person, box in enumerate(boxes):
        draw.rectangle(box, outline=SPEAKER_COLOURS[person], width=max(1, width // 200))
        draw.text((box[0] + 4, box[1] + 2), str(person + 1), fill=SPEAKER_COLOURS[person])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
