"""LongCat-Video-Avatar's audio path: padding, loudness in the reference's dtypes, v1.0's prefilter, the
streams of two speakers, the Whisper folder and its features (spec longcat §4). Parity with the reference
code is in tests/test_parity_longcat_audio.py."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyloudnorm
import pytest
import scipy.signal
import torch
from safetensors.torch import load_file, save_file

from multitalk_worker.errors import CheckpointError, InvalidInput, ModelMissing
from multitalk_worker.models.whisper_encoder import whisper_features
from multitalk_worker.pipeline import longcat_audio as la
from multitalk_worker.pipeline.longcat_segments import segment_windows
from multitalk_worker.pipeline.loudness import integrated_loudness
from multitalk_worker.pipeline.vocals import vocal_stage
from multitalk_worker.weights.wav2vec import load_wav2vec
from multitalk_worker.weights.whisper import check_whisper, load_whisper

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tools() -> ModuleType:
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("_parity_longcat_audio_ours")


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (
        0.3 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(6 * t)) + 0.01 * gen.standard_normal(t.shape)
    ).astype(np.float32)


def test_padding_to_the_rendered_length() -> None:
    assert la.rendered_seconds(1, 25) == 3.72 and la.rendered_seconds(2, 16) == 93 / 16 + 80 / 16
    short = la.pad_track(_speech(2.0), la.rendered_seconds(1, 25))
    # ceil((3.72 − 2.0)·16000) = ceil(27520.000000000004): the reference's float arithmetic adds 27 521
    assert short.padded and short.samples.shape[0] == 59_521 and short.samples.dtype == np.float32
    assert not np.any(short.samples[32_000:])
    long = la.pad_track(_speech(5.0), la.rendered_seconds(1, 25))
    assert not long.padded and long.samples.shape[0] == 80_000
    assert la.feature_frames(59_521, 25) == 93 and la.feature_frames(59_521, 32) == 119


def test_loudness_of_a_float64_track_is_pyloudnorms() -> None:
    """pyloudnorm keeps its filtered copy in the input's dtype; `store=np.float64` measures as it does on
    the reference's zero-padded (float64) array."""
    signal = _speech(3.0)
    assert integrated_loudness(signal, 16000, np.float64) == pyloudnorm.Meter(16000).integrated_loudness(
        signal.astype(np.float64)
    )
    assert integrated_loudness(signal, 16000) == pyloudnorm.Meter(16000).integrated_loudness(signal)


def test_normalise_in_the_references_dtypes() -> None:
    signal = _speech(3.0)
    padded = la.pad_track(signal.copy(), 4.0)
    gain = la.loudness_gain(padded)
    expected = (padded.samples.astype(np.float64) * gain).astype(np.float32)
    assert np.array_equal(la.normalise_track(padded), expected)
    plain = la.PaddedTrack(signal.copy(), padded=False)
    gain = la.loudness_gain(plain)
    assert np.array_equal(la.normalise_track(plain), signal * np.float32(gain))
    silent = la.PaddedTrack(np.zeros(16000, np.float32), padded=True)
    assert la.loudness_gain(silent) is None and not np.any(la.normalise_track(silent))


def test_v1_prefilter_streams_like_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked noise and low-pass give the samples of the reference's whole-array expressions."""
    track = la.pad_track(_speech(2.0), la.rendered_seconds(1, 16))
    gain = la.loudness_gain(track)
    draws = np.random.RandomState(7).randn(track.samples.shape[0]) * 10 ** (-45 / 20)
    b, a = scipy.signal.butter(3, 3000 / 8000)
    expected = scipy.signal.lfilter(b, a, track.samples.astype(np.float64) * gain + draws).astype(np.float32)
    monkeypatch.setattr(la, "CHUNK", 10_000)
    out = la.prefilter_track(la.PaddedTrack(track.samples.copy(), True), np.random.RandomState(7))
    assert np.array_equal(out, expected)


def test_streams_of_two_speakers() -> None:
    first, second = _speech(1.0), _speech(0.5, 1)
    streams = la.stream_tracks([first, second], "sequential", others=True)
    assert [s.shape[0] for s in streams] == [24_000] * 3
    assert np.array_equal(streams[0][:16000], first) and not np.any(streams[0][16000:])
    assert np.array_equal(streams[1][16000:], second) and not np.any(streams[2])
    assert len(la.stream_tracks([first], "parallel", others=False)) == 1
    with pytest.raises(InvalidInput):
        la.stream_tracks([first], "parallel", others=True)


def test_null_windows_are_zero() -> None:
    windows = torch.randn(2, 93, 5, 5, 8)
    assert torch.equal(la.null_windows(windows), torch.zeros_like(windows))


def test_whisper_folder_loads_and_pools(tools: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "whisper-large-v3"
    tools.write_tiny_whisper(folder, seed=3)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "WhisperForConditionalGeneration"
    ]
    assert check_whisper(folder) == []
    encoder, extractor = load_whisper(folder, device=CPU)
    assert encoder.conv1.weight.dtype == torch.float32
    stored = load_file(str(folder / "model.safetensors"))["model.encoder.layers.3.fc1.weight"]
    assert torch.equal(encoder.layers[3].fc1.weight, stored.float())
    signal = la.normalise_track(la.pad_track(_speech(2.0), 3.72))
    features = whisper_features(encoder, extractor, signal, la.feature_frames(signal.shape[0], 25))
    assert features.shape == (93, 5, 8) and torch.isfinite(features).all()
    assert not torch.allclose(features[:, 0], features[:, 4])  # the groups differ


def test_whisper_folder_faults(tools: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "whisper-large-v3"
    tools.write_tiny_whisper(folder, seed=3)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.encoder.layers.5.fc2.bias"]
    tensors["model.encoder.surprise"] = torch.zeros(1)
    save_file(tensors, str(path))
    problems = {(p.kind, p.key) for p in check_whisper(folder)}
    assert ("missing_tensor", "layers.5.fc2.bias") in problems
    assert ("unexpected_tensor", "model.encoder.surprise") in problems
    with pytest.raises(CheckpointError, match="whisper-large-v3/model.safetensors"):
        load_whisper(folder, device=CPU)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelMissing, match="preprocessor_config.json"):
        load_whisper(folder, device=CPU)


def test_prepare_two_speakers_with_the_v1_encoder() -> None:
    """The request-level entry: streams from the vocals, the plan from their frames at 16 fps, each stream
    padded to the rendered length and encoded (the tiny wav2vec2 at 32 Hz), the soundtrack from the raw
    tracks; v1.0's noise is reproducible from the seed."""
    model, extractor = load_wav2vec(REPO / "tests/fixtures/parity/wav2vec/chinese-wav2vec2-base", device=CPU)
    raw = [_speech(2.0, 1), _speech(1.5, 2)]
    vocals = [track * 0.5 for track in raw]
    encode = la.wav2vec_encoder(model, extractor)
    audio = la.prepare_longcat_audio(
        raw, vocals, "sequential", la.AUDIO_V10, encode, max_frames=10_000, others=True, seed=5
    )
    assert audio.plan.output_frames == 56 and len(audio.plan.segments) == 1  # 3.5 s at 16 fps
    samples = math.ceil(la.rendered_seconds(1, 16) * 16000)  # 93 frames: 5.8125 s
    assert [f.shape for f in audio.features] == [(la.feature_frames(samples, 32), 2, 16)] * 3
    assert audio.stride == 2 and audio.soundtrack.shape == (56_000,)
    assert np.array_equal(audio.soundtrack[:32_000], raw[0])  # the unseparated audio is muxed
    again = la.prepare_longcat_audio(
        raw, vocals, "sequential", la.AUDIO_V10, encode, max_frames=10_000, others=True, seed=5
    )
    assert all(torch.equal(a, b) for a, b in zip(audio.features, again.features, strict=True))
    windows = segment_windows(list(audio.features), audio.plan.segments[0], audio.stride)
    assert windows.shape == (3, 93, 5, 2, 16)


def test_vocal_stage_setting(tmp_path: Path) -> None:
    assert vocal_stage(tmp_path, enabled=False) is None
    with pytest.raises(ModelMissing):
        vocal_stage(tmp_path, enabled=True)
