"""chinese-wav2vec2-base as transformers' Wav2Vec2Model, and MultiTalk's 25 fps feature extraction
(spec 2.4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models.configs import AudioEncoderConfig
from multitalk_worker.timeline import SAMPLE_RATE, SAMPLES_PER_FRAME, audio_frames


def audio_encoder_config(cfg: AudioEncoderConfig) -> Wav2Vec2Config:
    """The transformers config of a base-size wav2vec2 (group-norm CNN, post-LN transformer)."""
    return Wav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim),
        conv_kernel=list(cfg.conv_kernel),
        conv_stride=list(cfg.conv_stride),
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        conv_bias=False,
        architectures=["Wav2Vec2ForPreTraining"],
    )


def build_audio_encoder(cfg: AudioEncoderConfig) -> Wav2Vec2Model:
    """A wav2vec2 encoder with freshly initialised weights, in eval mode."""
    return Wav2Vec2Model(audio_encoder_config(cfg)).eval().requires_grad_(False)


@torch.no_grad()
def audio_features(
    model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor, signal_16k: np.ndarray
) -> torch.Tensor:
    """Mono 16 kHz signal -> per-video-frame features `[La, layers, C]` float32 (spec 2.4).

    The CNN features are resampled to 25 fps (linear, align_corners=True) before the feature projection,
    so the transformer runs at 25 Hz; the output stacks the outputs of every transformer layer.
    """
    signal = np.asarray(signal_16k, dtype=np.float32)
    if signal.ndim != 1:
        raise InvalidInput(f"audio signal must be mono 1-D, got shape {signal.shape}")
    frames = audio_frames(signal.shape[0])
    if frames < 1:
        raise InvalidInput(
            f"audio of {signal.shape[0]} samples is shorter than one 25 fps frame "
            f"({SAMPLES_PER_FRAME} samples at 16 kHz)"
        )
    values = feature_extractor(signal, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    weight = model.feature_projection.projection.weight
    values = values.to(device=weight.device, dtype=weight.dtype)  # [1, n]

    def to_video_rate(_module: torch.nn.Module, _inputs: object, cnn: torch.Tensor) -> torch.Tensor:
        # CNN features [1, C_cnn, n_feat] (~50 Hz) -> [1, C_cnn, La] (25 Hz), before the projection
        return F.interpolate(cnn, size=frames, mode="linear", align_corners=True)

    hook = model.feature_extractor.register_forward_hook(to_video_rate)
    try:
        out = model(values, output_hidden_states=True)
    finally:
        hook.remove()
    layers = torch.stack(out.hidden_states[1:], dim=2)  # [1, La, layers, C]
    return layers[0].float()
