"""LongCat-Video-Avatar-1.5's audio features: transformers' Whisper encoder, pooled to 5 groups at 25 Hz
(spec longcat-avatar-inference.md §4.4).

For a loudness-normalised 16 kHz track of `n` samples and `L = int(n / 16000 · 25)` output frames:

1. consecutive 30 s slices (480 000 samples, the last one shorter) each through `WhisperFeatureExtractor`
   (zero-padded to 30 s: log-mel `[1, 128, 3000]`);
2. each slice through the encoder on its own (no overlap, no attention mask: the last slice's zero padding
   is attended to), all 33 hidden states: 0 = the embeddings, 1-31 = layer outputs, 32 = the final
   LayerNorm of layer 32's output; the first `2L` encoder frames (50 Hz) of the whole track are used;
3. mean of states 0-7, 8-15, 16-23, 24-31, and state 32 alone: 5 groups;
4. each group resampled from `2L` to `L` frames by linear interpolation with `align_corners=True`.

Memory: one slice's 33 states (`[1, 1500, 33, C]`, 253 MB at C = 1280, plus the tuple the encoder returns)
at a time; what grows with the track is the pooled 50 Hz features `[2L, 5, C]` (0.64 MB per second of audio
at C = 1280) and the output `[L, 5, C]` (half that). The reference stacks all 33 states of the whole
track (8.4 MB per second).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from multitalk_worker.errors import InvalidInput

SAMPLE_RATE = 16_000
SLICE_SAMPLES = 480_000  # 30 s: the feature extractor's window
ENCODER_RATE = 50  # encoder frames per second
GROUPS = ((0, 8), (8, 16), (16, 24), (24, 32))  # hidden states averaged per group; state 32 is the fifth
FINAL_STATE = 32


def check_extractor(extractor: WhisperFeatureExtractor, encoder: WhisperEncoder) -> None:
    """The extractor must make 16 kHz, 30 s windows of the encoder's mel bins."""
    if extractor.sampling_rate != SAMPLE_RATE or extractor.n_samples != SLICE_SAMPLES:
        raise ValueError(
            f"the Whisper feature extractor must take 30 s windows at {SAMPLE_RATE} Hz; its config says "
            f"{extractor.n_samples} samples at {extractor.sampling_rate} Hz"
        )
    if extractor.feature_size != encoder.config.num_mel_bins:
        raise ValueError(
            f"the feature extractor makes {extractor.feature_size} mel bins, the encoder takes "
            f"{encoder.config.num_mel_bins}"
        )
    if encoder.config.encoder_layers != FINAL_STATE:
        raise ValueError(
            f"LongCat pools 33 Whisper states; the encoder has {encoder.config.encoder_layers} layers"
        )


def _pooled_slice(encoder: WhisperEncoder, mel: Tensor, keep: int) -> list[Tensor]:
    """The 5 groups `[1, keep, C]` of one slice's first `keep` encoder frames."""
    hidden = encoder(mel, output_hidden_states=True).hidden_states  # 33 x [1, 1500, C]
    stacked = torch.stack(hidden, dim=2)[:, :keep]  # [1, keep, 33, C]
    del hidden
    groups = [stacked[:, :, first:last].mean(dim=2) for first, last in GROUPS]
    groups.append(stacked[:, :, FINAL_STATE])
    return groups


@torch.no_grad()
def whisper_features(
    encoder: WhisperEncoder, extractor: WhisperFeatureExtractor, signal: np.ndarray, frames: int
) -> Tensor:
    """A loudness-normalised 16 kHz mono track -> `[frames, 5, C]` float32 on the encoder's device, where
    `frames` is `int(n / 16000 · 25)` (the caller's length rule)."""
    if signal.ndim != 1:
        raise InvalidInput(f"audio signal must be mono 1-D, got shape {signal.shape}")
    if frames < 2 or 2 * frames > signal.shape[0] // (SAMPLE_RATE // ENCODER_RATE) + 1:
        raise InvalidInput(f"{signal.shape[0]} samples cannot give {frames} Whisper feature frames")
    check_extractor(extractor, encoder)
    weight = encoder.conv1.weight
    needed = 2 * frames  # 50 Hz encoder frames used
    parts: list[list[Tensor]] = []
    done = 0
    for start in range(0, signal.shape[0], SLICE_SAMPLES):
        if done >= needed:
            break
        mel = extractor(signal[start : start + SLICE_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        mel = mel.input_features.to(weight.dtype).to(weight.device)  # [1, mel bins, 3000]
        keep = min(needed - done, encoder.config.max_source_positions)
        parts.append(_pooled_slice(encoder, mel, keep))
        done += keep
    out = []
    for group in range(len(GROUPS) + 1):
        track = torch.cat([part[group] for part in parts], dim=1)  # [1, 2L, C]
        track = F.interpolate(track.transpose(1, 2), size=frames, align_corners=True, mode="linear")
        out.append(track.transpose(1, 2))  # [1, L, C]
    return torch.stack(out, dim=2)[0]  # [L, 5, C]
