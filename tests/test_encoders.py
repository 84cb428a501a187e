"""Numerics of the encoder helpers: text cut-to-length, CLIP preprocessing and penultimate block, 25 fps
wav2vec2 features, VAE normalisation and shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models import audio_encoder
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.configs import TINY
from multitalk_worker.models.image_encoder import CLIP_MEAN, CLIP_STD, encode_image, preprocess_image
from multitalk_worker.models.text_encoder import encode_text
from multitalk_worker.models.vae import vae_decode, vae_encode
from multitalk_worker.timeline import audio_frames
from multitalk_worker.tiny import build_tiny_bundle
from multitalk_worker.weights.loader import ModelBundle


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return build_tiny_bundle(seed=1, dtype=torch.float32)


def test_encode_text_cuts_each_row_to_its_tokens(bundle: ModelBundle) -> None:
    batch = bundle.tokenizer(
        ["a man talking to the camera", "hello"], padding="max_length", max_length=16, return_tensors="pt"
    )
    rows = encode_text(bundle.text_encoder, batch.input_ids, batch.attention_mask)
    assert [r.shape for r in rows] == [(7, TINY.text_encoder.d_model), (6, TINY.text_encoder.d_model)]
    alone = encode_text(bundle.text_encoder, batch.input_ids[1:], batch.attention_mask[1:])[0]
    torch.testing.assert_close(rows[1], alone)  # padding and batch neighbours do not leak in
    full = bundle.text_encoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    assert torch.equal(rows[0], full[0, :7])


def test_encode_text_runs_in_bf16() -> None:
    tiny = build_tiny_bundle(seed=1)
    ids = torch.tensor([[5, 6, 1, 0]])
    (row,) = encode_text(tiny.text_encoder, ids, (ids > 0).long())
    assert row.dtype == torch.bfloat16 and row.shape == (3, TINY.text_encoder.d_model)


def test_clip_preprocessing_is_plain_bicubic_then_clip_normalisation() -> None:
    image = torch.linspace(-1, 1, 3 * 30 * 50).reshape(1, 3, 30, 50)
    resized = F.interpolate(
        image, size=(224, 224), mode="bicubic", align_corners=False
    )  # no antialias, no crop
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_image(image, 224), ((resized + 1) / 2 - mean) / std)
    grey = preprocess_image(torch.zeros(1, 3, 8, 8), 224)  # 0 in [-1, 1] is 0.5 in [0, 1]
    torch.testing.assert_close(grey[0, :, 0, 0], (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


def test_encode_image_is_the_penultimate_block(bundle: ModelBundle) -> None:
    encoder = bundle.image_encoder
    image = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = encode_image(encoder, image)
    n_patches = (TINY.image_encoder.image_size // TINY.image_encoder.patch_size) ** 2
    assert tokens.shape == (1, n_patches + 1, TINY.image_encoder.hidden_size)
    with torch.no_grad():  # embeddings, pre-LN, all blocks but the last; no post-LN
        x = encoder.pre_layrnorm(encoder.embeddings(preprocess_image(image, 224)))
        for layer in encoder.encoder.layers[:-1]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
    torch.testing.assert_close(tokens, x)


@pytest.mark.parametrize("samples", [640, 9999, 16000, 40123])
def test_audio_features_are_at_25_fps_with_every_layer(bundle: ModelBundle, samples: int) -> None:
    signal = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    features = audio_features(bundle.audio_encoder, bundle.feature_extractor, signal)
    frames = int(samples / 16000 * 25)
    assert audio_frames(samples) == frames
    assert features.shape == (frames, TINY.audio_encoder.num_hidden_layers, TINY.audio_encoder.hidden_size)
    assert features.dtype == torch.float32


def test_audio_features_resample_cnn_features_before_the_transformer(bundle: ModelBundle) -> None:
    model = bundle.audio_encoder
    signal = np.sin(np.arange(12345) / 11.0).astype(np.float32)
    features = audio_features(model, bundle.feature_extractor, signal)
    values = torch.from_numpy(bundle.feature_extractor(signal, sampling_rate=16000).input_values[0])[None]
    with torch.no_grad():
        cnn = model.feature_extractor(values.float())  # [1, C, n_feat] at ~50 Hz
        cnn = F.interpolate(cnn, size=int(12345 / 16000 * 25), mode="linear", align_corners=True)
        x, _ = model.feature_projection(cnn.transpose(1, 2))
        x = model.encoder.layer_norm(x + model.encoder.pos_conv_embed(x))
        layers = []
        for layer in model.encoder.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
            layers.append(x)
    assert torch.equal(features, torch.stack(layers, dim=2)[0])  # one CNN call: the library's numerics


def test_input_values_are_the_feature_extractors(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    signal = (np.random.default_rng(3).standard_normal(50_000) * 0.2 + 0.05).astype(np.float32)
    expected = bundle.feature_extractor(signal, sampling_rate=16000, return_tensors="pt").input_values
    values = audio_encoder.InputValues(signal, bundle.feature_extractor, torch.device("cpu"), torch.float32)
    assert torch.equal(values[:], expected)  # bit for bit
    assert torch.equal(values[1000:2000], expected[:, 1000:2000])
    monkeypatch.setattr(audio_encoder, "VARIANCE_CHUNK", 4096)  # a long track: the variance in chunks
    chunked = audio_encoder.InputValues(signal, bundle.feature_extractor, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(chunked[:], expected, rtol=1e-6, atol=1e-6)


def test_audio_features_in_cnn_slices_match_one_call(bundle: ModelBundle) -> None:
    """A long track's CNN runs in slices with whole-track group-norm statistics: the features of one call,
    to float32 rounding, for slices that do and do not divide the track."""
    signal = voiced_noise(16000 * 3 + 777)
    whole = audio_features(bundle.audio_encoder, bundle.feature_extractor, signal)
    for chunk in (7, 40, 64):
        sliced = audio_features(bundle.audio_encoder, bundle.feature_extractor, signal, chunk_frames=chunk)
        torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def voiced_noise(samples: int) -> np.ndarray:
    t = np.arange(samples) / 16000
    tone = np.sin(2 * np.pi * 190 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    return (0.3 * tone + 0.02 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32)


def test_audio_shorter_than_one_frame_is_rejected(bundle: ModelBundle) -> None:
    with pytest.raises(InvalidInput, match="shorter than one 25 fps frame"):
        audio_features(bundle.audio_encoder, bundle.feature_extractor, np.zeros(639, dtype=np.float32))
    with pytest.raises(InvalidInput, match="mono"):
        audio_features(bundle.audio_encoder, bundle.feature_extractor, np.zeros((2, 16000), dtype=np.float32))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_vae_shapes_for_1_plus_4k_frames(bundle: ModelBundle, k: int) -> None:
    video = torch.rand(1, 3, 1 + 4 * k, 16, 32, generator=torch.Generator().manual_seed(k)) * 2 - 1
    latent = vae_encode(bundle.vae, video)
    assert latent.shape == (1, 16, 1 + k, 2, 4) and latent.dtype == torch.float32
    decoded = vae_decode(bundle.vae, latent)
    assert decoded.shape == (1, 3, 1 + 4 * k, 16, 32)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_vae_latents_are_normalised_posterior_means(bundle: ModelBundle) -> None:
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        mu = bundle.vae.encode(video).latent_dist.mean
        decoded = bundle.vae.decode(mu).sample
    mean = torch.tensor(TINY.vae.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(TINY.vae.latents_std).view(1, 16, 1, 1, 1)
    latent = vae_encode(bundle.vae, video)
    torch.testing.assert_close(latent, (mu - mean) / std)
    torch.testing.assert_close(vae_decode(bundle.vae, latent), decoded.clamp(-1, 1))
