"""chinese-wav2vec2-base as transformers' Wav2Vec2Model, and MultiTalk's 25 fps feature extraction
(spec 2.4)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2Encoder,
    Wav2Vec2EncoderStableLayerNorm,
    Wav2Vec2FeatureEncoder,
)

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models.configs import AudioEncoderConfig
from multitalk_worker.timeline import SAMPLE_RATE, SAMPLES_PER_FRAME, audio_frames

CNN_CHUNK_FRAMES = 512  # CNN output frames (50 Hz: about 10 s of speech) computed at a time
VARIANCE_CHUNK = 1 << 20  # samples (65 s) summed at a time for a long track's input normalisation


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
    model: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    signal_16k: np.ndarray,
    chunk_frames: int = CNN_CHUNK_FRAMES,
    frames: int | None = None,
) -> torch.Tensor:
    """Mono 16 kHz signal -> per-video-frame features `[La, layers, C]` float32 (spec 2.4).

    The CNN features are resampled to `frames` (default: the 25 fps frames `La`; LongCat-Video-Avatar 1.0
    asks for 32 Hz, `int(n / 16000 · 32)`) by linear interpolation with align_corners=True before the
    feature projection, so the transformer runs at that rate; the output stacks the outputs of every
    transformer layer. Memory: the
    normalised input and the CNN run `chunk_frames` CNN frames at a time (`_cnn_features`), so a long track
    is never held again at the CNN's width; the transformer sees the whole track, as in the reference.
    """
    signal = np.asarray(signal_16k, dtype=np.float32)
    if signal.ndim != 1:
        raise InvalidInput(f"audio signal must be mono 1-D, got shape {signal.shape}")
    frames = audio_frames(signal.shape[0]) if frames is None else frames
    if frames < 1:
        raise InvalidInput(
            f"audio of {signal.shape[0]} samples is shorter than one 25 fps frame "
            f"({SAMPLES_PER_FRAME} samples at 16 kHz)"
        )
    weight = model.feature_projection.projection.weight
    values = InputValues(signal, feature_extractor, weight.device, weight.dtype)
    cnn = _cnn_features(model.feature_extractor, values, chunk_frames)  # [1, C_cnn, n_feat] (~50 Hz)
    cnn = F.interpolate(cnn, size=frames, mode="linear", align_corners=True)  # [1, C_cnn, La] (25 Hz)
    hidden, _ = model.feature_projection(cnn.transpose(1, 2))
    return _layer_outputs(model.encoder, hidden)


class InputValues:
    """The feature extractor's `input_values` of one signal, a slice at a time.

    `Wav2Vec2FeatureExtractor.__call__` holds the track about four times over (its copy, the centred and
    the scaled array, the tensor); this applies its zero-mean unit-variance normalisation with its float32
    arithmetic (`(x - x.mean()) / np.sqrt(x.var() + 1e-7)`) to each slice as it is asked for. A track of
    at most `VARIANCE_CHUNK` samples gets numpy's `var()` itself, so the same values as the extractor, bit
    for bit; a longer one sums its squared deviations a chunk at a time (float32 rounding apart).
    """

    def __init__(
        self,
        signal: np.ndarray,
        extractor: Wav2Vec2FeatureExtractor,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if extractor.sampling_rate != SAMPLE_RATE or extractor.feature_size != 1:
            raise ValueError(
                f"the wav2vec2 feature extractor must take 16 kHz mono input; its config says "
                f"{extractor.sampling_rate} Hz, feature size {extractor.feature_size}"
            )
        self.signal, self.device, self.dtype = signal, device, dtype
        self.mean = self.scale = None
        if extractor.do_normalize:
            self.mean = signal.mean()
            self.scale = np.sqrt(_variance(signal, self.mean) + 1e-7)

    def __len__(self) -> int:
        return int(self.signal.shape[0])

    def __getitem__(self, index: slice) -> torch.Tensor:
        """Samples `index` as the model's input `[1, n]` on its device and dtype."""
        part = self.signal[index]
        if self.mean is not None:
            part = (part - self.mean) / self.scale
        return torch.from_numpy(np.ascontiguousarray(part))[None].to(self.device, self.dtype)


def _variance(signal: np.ndarray, mean: np.float32) -> np.float32:
    """numpy's float32 `signal.var()`, without its temporary of the whole track when the track is long."""
    if signal.shape[0] <= VARIANCE_CHUNK:
        return signal.var()
    total = 0.0
    for start in range(0, signal.shape[0], VARIANCE_CHUNK):
        total += float(np.sum(np.square(signal[start : start + VARIANCE_CHUNK] - mean)))
    return np.float32(total / signal.shape[0])


def _cnn_features(encoder: Wav2Vec2FeatureEncoder, values: InputValues, chunk_frames: int) -> torch.Tensor:
    """wav2vec2's CNN (`Wav2Vec2FeatureEncoder`) over `values` -> `[1, C, n_feat]`.

    A track of up to `chunk_frames` output frames goes through the module in one call. A longer one runs in
    slices of `chunk_frames` output frames, each fed the samples of its receptive field; every layer is
    local except the first one's GroupNorm (one group per channel, statistics over the whole track), whose
    mean and variance come from a first pass over the first convolution's output (float64 sums), so the
    result is the one-call result to float32 rounding (tests/test_encoders.py) at a slice's memory.
    """
    layers: list[Any] = list(encoder.conv_layers)  # wav2vec2's conv layer classes (ModuleList: Module)
    kernels = [layer.conv.kernel_size[0] for layer in layers]
    strides = [layer.conv.stride[0] for layer in layers]
    lengths = [len(values)]
    for kernel, stride in zip(kernels, strides, strict=True):
        lengths.append((lengths[-1] - kernel) // stride + 1)
    if lengths[-1] <= chunk_frames:
        return encoder(values[:])
    hop, field = math.prod(strides), 1
    for kernel, stride in zip(reversed(kernels), reversed(strides), strict=True):
        field = (field - 1) * stride + kernel  # input samples one output frame sees
    first, norm = layers[0], getattr(layers[0], "layer_norm", None)
    stats = None  # (norm, mean, var) of the first layer's GroupNorm
    if isinstance(norm, torch.nn.GroupNorm):
        if norm.num_groups != norm.num_channels:
            raise ValueError("wav2vec2's first CNN layer must normalise each channel on its own")
        stats = (norm, *_channel_stats(first.conv, values, lengths[1], chunk_frames * hop // strides[0]))
    out = None  # [1, C, n_feat], written slice by slice (no list of slices to concatenate)
    for begin in range(0, lengths[-1], chunk_frames):
        end = min(begin + chunk_frames, lengths[-1])
        x = values[begin * hop : (end - 1) * hop + field][:, None]  # [1, 1, n]
        rest = layers
        if stats is not None:
            x = first.activation(_normalise_channels(first.conv(x), *stats))
            rest = layers[1:]
        for layer in rest:
            x = layer(x)
        if x.shape[-1] != end - begin:
            raise RuntimeError(f"CNN slice of {x.shape[-1]} frames, expected {end - begin}")
        if out is None:
            out = x.new_empty(x.shape[0], x.shape[1], lengths[-1])
        out[..., begin:end] = x
    assert out is not None  # lengths[-1] > chunk_frames >= 1: the loop ran
    return out


def _channel_stats(
    conv: torch.nn.Conv1d, values: InputValues, frames: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of `conv` over the whole track, in float64."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    total = squares = torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    for begin in range(0, frames, chunk):
        end = min(begin + chunk, frames)
        y = conv(values[begin * stride : (end - 1) * stride + kernel][:, None])[0].double()  # [C, n]
        total = total + y.sum(dim=1)
        squares = squares + (y * y).sum(dim=1)
    mean = total / frames
    return mean, squares / frames - mean * mean


def _normalise_channels(
    x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """`norm` (one group per channel) applied to a slice `[1, C, n]` with the whole track's statistics."""
    shift = mean.to(x.dtype)[None, :, None]
    scale = torch.rsqrt(var + norm.eps).to(x.dtype)[None, :, None]
    out = (x - shift) * scale
    return out * norm.weight[None, :, None] + norm.bias[None, :, None] if norm.affine else out


def _layer_outputs(
    encoder: Wav2Vec2Encoder | Wav2Vec2EncoderStableLayerNorm, hidden: torch.Tensor
) -> torch.Tensor:
    """Run wav2vec2's transformer on `hidden [1, La, C]`; each layer's output, as it comes, into one
    `[La, layers, C]` float32 tensor (not a tuple of every layer stacked afterwards: half the memory)."""
    layers = list(encoder.layers)
    out = torch.empty(hidden.shape[1], len(layers), hidden.shape[2], device=hidden.device)
    handles = []
    for index, layer in enumerate(layers):

        def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor, index: int = index) -> None:
            out[:, index].copy_(output[0])  # the layer's hidden states [1, La, C] (transformers 5)

        handles.append(layer.register_forward_hook(keep))
    try:
        encoder(hidden)
    finally:
        for handle in handles:
            handle.remove()
    return out
