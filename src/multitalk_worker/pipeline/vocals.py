"""Vocal separation for LongCat-Video-Avatar: the MDX-Net model `vocal_separator/Kim_Vocal_2.onnx` through
onnxruntime, computed as audio-separator 0.30.2 (the reference's pin) computes it (spec
longcat-avatar-inference.md §4.1). The separated vocal drives the model; the original audio is muxed.

Why onnxruntime and not the audio-separator package: audio-separator (MIT) pulls about 20 packages (diffq,
onnx2torch, pydub, resampy, samplerate==0.1.0, a `beartype<0.19` pin, ...) and downloads UVR's model-data
files from the network when it loads a model; onnxruntime (MIT) adds only flatbuffers to our lock, and the
separation itself is a short STFT / overlap-add around one ONNX call.

audio-separator's path for an input file, with its defaults and the model's MDX parameters (UVR's
`mdx_model_data.json`, which audio-separator looks up by the model's hash and downloads into the model folder
when absent; we read it when the folder has it, and otherwise use Kim_Vocal_2's values: n_fft 7680, hop
1024, 3072 frequency bins, 256 frames, compensate 1.009, as third-party ports state them):

1. the file at 44.1 kHz stereo (librosa: soxr HQ; mono duplicated); scaled down to peak 0.9 if above;
2. zero-padded (`trim = n_fft/2` in front, to a whole number of `chunk − 2·trim` steps behind) and cut into
   chunks of `hop·255` samples every `0.75·chunk` samples (the last one zero-filled); each chunk: STFT
   (periodic Hann, centred), the first 3 frequency bins zeroed, the ONNX model (`input`
   `[1, 4, 3072, 256]`: channel × (real, imaginary)), inverse STFT (bins above 3072 zero); chunks
   overlap-added with a Hann window of the chunk's length and divided by the summed windows;
3. the trim removed, cut to the input's length, times `compensate`, scaled down to peak 0.9 if above;
4. written as 16-bit PCM (`int16(x·32767)`, truncated), which the reference reads back with librosa at
   16 kHz (÷32768, channel mean, soxr HQ).

Memory: the 44.1 kHz stereo input and the separated stem (about 0.7 MB per second of audio together) and
one chunk's spectrogram; what audio-separator holds besides (its second, "match mix" demix for the
instrumental stem it does not write) is not computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import soxr
import torch
from av.error import FFmpegError

from multitalk_worker.errors import AudioDecodeFailed, ModelMissing
from multitalk_worker.pipeline.audio import check_stream

logger = logging.getLogger(__name__)

VOCAL_DIR = "vocal_separator"
VOCAL_MODEL = "Kim_Vocal_2.onnx"
MODEL_DATA = "mdx_model_data.json"  # UVR's MDX parameters by model hash, which audio-separator reads there
HASHED_BYTES = 10_000 * 1024  # audio-separator hashes the last 10 240 000 bytes of a model file
SEPARATION_RATE = 44_100
OUTPUT_RATE = 16_000
PEAK = 0.9  # audio-separator's normalization_threshold
ZEROED_BINS = 3
INT16_SCALE = 32767  # audio-separator's writer
INT16_READ = 32768  # librosa / soundfile's reader


@dataclass(frozen=True)
class MdxParams:
    """The MDX-Net model's STFT geometry and audio-separator's chunking (Kim_Vocal_2's values)."""

    n_fft: int = 7680
    hop: int = 1024
    dim_f: int = 3072
    dim_t: int = 256
    compensate: float = 1.009
    overlap: float = 0.25

    @property
    def trim(self) -> int:
        return self.n_fft // 2

    @property
    def chunk(self) -> int:
        return self.hop * (self.dim_t - 1)


class OnnxSession(Protocol):
    """What the stage uses of `onnxruntime.InferenceSession`."""

    def run(self, output_names: Any, input_feed: Any) -> Sequence[Any]: ...


class VocalSeparator:
    """One job: a stereo 44.1 kHz mix in, its vocal stem out (steps 2-3 of the module's list)."""

    def __init__(self, session: OnnxSession, params: MdxParams = MdxParams()) -> None:
        self.session = session  # the model's graph, with an input named "input"
        self.params = params
        self.window = torch.hann_window(params.n_fft, periodic=True)

    def _model(self, chunk: np.ndarray) -> np.ndarray:
        """One chunk `[2, chunk]` float32 through STFT, the model and the inverse STFT."""
        p = self.params
        spec = torch.stft(
            torch.from_numpy(chunk),
            n_fft=p.n_fft,
            hop_length=p.hop,
            window=self.window,
            center=True,
            return_complex=True,
        )  # [2, bins, frames] complex
        spec = torch.view_as_real(spec).permute(0, 3, 1, 2).reshape(1, 4, -1, spec.shape[-1])[:, :, : p.dim_f]
        spec[:, :, :ZEROED_BINS] *= 0  # as audio-separator (keeps the sign of zero)
        out = torch.from_numpy(self.session.run(None, {"input": spec.numpy()})[0])  # [1, 4, dim_f, frames]
        bins = p.n_fft // 2 + 1
        out = torch.cat([out, torch.zeros(1, 4, bins - p.dim_f, out.shape[-1])], dim=2)
        out = out.reshape(2, 2, bins, -1).permute(0, 2, 3, 1)
        wave = torch.istft(
            out[..., 0] + out[..., 1] * 1.0j, n_fft=p.n_fft, hop_length=p.hop, window=self.window, center=True
        )
        return wave.numpy()  # [2, chunk]

    def separate(self, mix: np.ndarray) -> np.ndarray:
        """`mix [2, n]` float32 at 44.1 kHz -> the vocal stem `[2, n]` float32 (peak at most 0.9)."""
        p = self.params
        mix = _peak_limited(mix.astype(np.float32, copy=True))
        gen = p.chunk - 2 * p.trim
        pad = gen + p.trim - mix.shape[-1] % gen
        mixture = np.concatenate([np.zeros((2, p.trim), np.float32), mix, np.zeros((2, pad), np.float32)], 1)
        step = int((1 - p.overlap) * p.chunk)
        result = np.zeros((2, mixture.shape[-1]), np.float32)
        divider = np.zeros((2, mixture.shape[-1]), np.float32)
        for start in range(0, mixture.shape[-1], step):
            end = min(start + p.chunk, mixture.shape[-1])
            window = np.hanning(end - start)
            part = mixture[:, start:end]
            if end - start < p.chunk:
                part = np.concatenate([part, np.zeros((2, p.chunk - (end - start)), np.float32)], 1)
            out = self._model(part)
            out[:, : end - start] *= window
            divider[:, start:end] += window
            result[:, start:end] += out[:, : end - start]
        stem = (result / divider)[:, p.trim : -p.trim][:, : mix.shape[-1]]
        stem *= p.compensate
        return _peak_limited(stem)

    def vocals_16k(self, mix: np.ndarray) -> np.ndarray:
        """The vocal stem as the reference reads it back: 16-bit PCM (audio-separator's writer limits the
        peak once more first), channel mean, soxr HQ to 16 kHz."""
        pcm = (_peak_limited(self.separate(mix)) * INT16_SCALE).astype(np.int16)
        mono = np.mean(pcm.astype(np.float32) / INT16_READ, axis=0, dtype=np.float32)
        return soxr.resample(mono, SEPARATION_RATE, OUTPUT_RATE, quality="HQ").astype(np.float32)


def _peak_limited(wave: np.ndarray) -> np.ndarray:
    """audio-separator's `normalize(wave, 0.9)`: scaled down (in place) only when the peak exceeds 0.9; the
    factor `0.9 / peak` in float64 as NumPy 1.26 (the reference's pin) computes a Python float over a
    float32 scalar, then applied in float32."""
    peak = float(np.abs(wave).max())
    if peak > PEAK:
        wave *= np.float32(PEAK / peak)
    return wave


def read_stereo_44k(path: Path) -> np.ndarray:
    """The first audio stream of `path` as float32 `[2, n]` at 44.1 kHz (mono duplicated, more channels:
    the first two), as audio-separator loads it (soxr HQ)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeFailed(f"{path.name}: no audio stream found")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            check_stream(rate, int(stream.codec_context.channels or 0), path.name)
            frames = [_planar(frame) for frame in container.decode(stream)]
    except (FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeFailed(f"{path.name}: not a readable audio or video file ({exc})") from exc
    if not frames:
        raise AudioDecodeFailed(f"{path.name}: the audio stream holds no samples")
    audio = np.concatenate(frames, axis=1)
    audio = np.repeat(audio, 2, axis=0) if audio.shape[0] == 1 else audio[:2]
    if rate != SEPARATION_RATE:
        audio = soxr.resample(audio.T, rate, SEPARATION_RATE, quality="HQ").T
    return np.ascontiguousarray(audio, dtype=np.float32)


def _planar(frame: av.AudioFrame) -> np.ndarray:
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        data = data.reshape(-1, len(frame.layout.channels)).T
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data.astype(np.float32)


def vocal_model_path(model_dir: Path) -> Path:
    return model_dir / VOCAL_DIR / VOCAL_MODEL


def model_hash(path: Path) -> str:
    """audio-separator's model key: the MD5 of the file's last 10 240 000 bytes (of all of a smaller file)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        file.seek(max(0, size - HASHED_BYTES))
        return hashlib.md5(file.read()).hexdigest()  # noqa: S324 - a lookup key, as audio-separator's


def model_params(path: Path) -> MdxParams:
    """The MDX parameters of the model at `path`: from `mdx_model_data.json` beside it when that file lists
    the model's hash (audio-separator downloads UVR's file there at load, unless it is already present),
    else Kim_Vocal_2's (`MdxParams()`)."""
    data_file = path.parent / MODEL_DATA
    if not data_file.is_file():
        return MdxParams()
    try:
        entry = json.loads(data_file.read_text()).get(model_hash(path))
    except (OSError, ValueError) as exc:
        raise ModelMissing(f"{VOCAL_DIR}/{MODEL_DATA} is not readable JSON ({exc})") from exc
    if entry is None:
        logger.info("%s does not list %s; using Kim_Vocal_2's parameters", MODEL_DATA, path.name)
        return MdxParams()
    return MdxParams(
        n_fft=int(entry["mdx_n_fft_scale_set"]),
        dim_f=int(entry["mdx_dim_f_set"]),
        dim_t=2 ** int(entry["mdx_dim_t_set"]),
        compensate=float(entry["compensate"]),
    )


def load_vocal_separator(model_dir: Path, *, providers: list[str] | None = None) -> VocalSeparator:
    """The separator of the model folder; ModelMissing (with the way out) when its file is absent."""
    path = vocal_model_path(model_dir)
    if not path.is_file():
        raise ModelMissing(
            f"missing vocal separator {VOCAL_DIR}/{VOCAL_MODEL} in {model_dir}: LongCat-Video-Avatar drives "
            "the model with the separated vocals; add the file (it is part of the published model folder) "
            "or turn vocal separation off to drive it with the audio as sent"
        )
    import onnxruntime  # the runtime dependency of this stage only

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )
    return VocalSeparator(session, model_params(path))


def vocal_stage(
    model_dir: Path, enabled: bool, *, providers: list[str] | None = None
) -> VocalSeparator | None:
    """The stage as a request sets it: on by default for LongCat-Video-Avatar, loaded from the model
    folder (ModelMissing when its file is absent); None when `enabled` is false (the audio as sent drives
    the model, as with MultiTalk)."""
    return load_vocal_separator(model_dir, providers=providers) if enabled else None


def separated_vocals(path: Path, separator: VocalSeparator | None) -> np.ndarray | None:
    """The 16 kHz mono vocal of one input file, or None when separation is off (`separator` None)."""
    if separator is None:
        return None
    return separator.vocals_16k(read_stereo_44k(path))
