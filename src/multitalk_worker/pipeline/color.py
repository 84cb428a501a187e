"""Colour correction of generated clips towards the reference image in CIE Lab (spec 6.7).

Per frame: Lab mean/std transfer of each channel to the reference's statistics (population std), back to
RGB, clipped, blended with the original by `strength`. Frames whose conversion fails keep their colours.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from skimage import color

from multitalk_worker.errors import InvalidInput

logger = logging.getLogger(__name__)


def _transfer(frame_lab: np.ndarray, ref_lab: np.ndarray) -> np.ndarray:
    """Match each Lab channel's mean and std to the reference's; a flat channel becomes the reference mean."""
    out = frame_lab.copy()
    for channel in range(3):
        mean_src, std_src = frame_lab[..., channel].mean(), frame_lab[..., channel].std()
        mean_ref, std_ref = ref_lab[..., channel].mean(), ref_lab[..., channel].std()
        if std_src == 0:
            out[..., channel] = mean_ref
        else:
            out[..., channel] = (out[..., channel] - mean_src) * (std_ref / std_src) + mean_ref
    return out


def _correct_frame(frame: np.ndarray, ref_lab: np.ndarray, strength: float) -> np.ndarray:
    try:
        corrected = color.lab2rgb(_transfer(color.rgb2lab(frame), ref_lab))
    except ValueError as exc:
        logger.warning("colour correction skipped for one frame: %s", exc)
        return frame
    return (1 - strength) * frame + strength * np.clip(corrected, 0.0, 1.0)


def match_colors(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """video [3, F, H, W] and reference [3, H, W], both in [-1, 1] -> corrected video [3, F, H, W].

    Returns `video` itself when `strength` is 0. Runs on CPU (scikit-image); result float32 on the
    video's device.
    """
    if not 0.0 <= strength <= 1.0:
        raise InvalidInput(f"colour correction strength {strength} is not accepted; use a value in [0, 1]")
    if strength == 0.0:
        return video
    frames = np.clip((video.permute(1, 2, 3, 0).cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)  # [F, H, W, 3]
    ref = np.clip((reference.permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
    try:
        ref_lab = color.rgb2lab(ref)
    except ValueError as exc:
        logger.warning("colour correction skipped for a clip: %s", exc)
        return video
    corrected = np.stack([_correct_frame(frame, ref_lab, strength) for frame in frames])
    out = torch.from_numpy(corrected * 2.0 - 1.0).permute(3, 0, 1, 2).contiguous()
    return out.to(device=video.device, dtype=video.dtype)
