"""The vocal-separation stage (pipeline/vocals.py): the typed refusal, file reading, and the MDX plumbing
(STFT, chunking, overlap-add, the ONNX call) on tiny ONNX models written here with the published model's
input name and shape. Parity with audio-separator is in tests/test_parity_longcat_audio.py."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile

from multitalk_worker.errors import AudioDecodeFailed, ModelMissing
from multitalk_worker.pipeline import vocals

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tools() -> ModuleType:
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("_parity_longcat_audio_ours")


def _identity_model(folder: Path) -> None:
    """Kim_Vocal_2's interface with `output = input` (a mask of ones)."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["batch", 4, 3072, 256]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity_mdx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (folder / vocals.VOCAL_DIR).mkdir(parents=True)
    onnx.save(model, str(vocals.vocal_model_path(folder)))


def test_missing_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing, match="vocal_separator/Kim_Vocal_2.onnx.*turn vocal separation off"):
        vocals.load_vocal_separator(tmp_path)
    assert vocals.separated_vocals(tmp_path / "any.wav", None) is None  # separation off: nothing read


def test_an_all_pass_model_returns_the_mix(tmp_path: Path) -> None:
    """With `output = input` the stem is the mix times 1.009: the STFT, the overlap-add of 3 chunks and the
    inverse STFT put the samples back. Not near the track's ends: there a chunk's edge (reflect-padded by
    the centred STFT, its bins above 3072 dropped, the 3 lowest zeroed) is not covered by a neighbour."""
    _identity_model(tmp_path)
    separator = vocals.load_vocal_separator(tmp_path)
    t = np.arange(int(12.0 * 44100)) / 44100
    mix = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)
    stem = separator.separate(mix)
    assert stem.shape == mix.shape and stem.dtype == np.float32
    inner = slice(44_100, -44_100)
    assert np.abs(stem - mix * np.float32(1.009))[:, inner].max() < 1e-5
    loud = separator.separate(mix * 3)  # peak 1.5: limited to 0.9 before and after
    assert abs(float(np.abs(loud).max()) - 0.9) < 1e-6


def test_vocals_at_16k_and_file_reading(tools: ModuleType, tmp_path: Path) -> None:
    tools.write_tiny_mdx(tmp_path / vocals.VOCAL_DIR / vocals.VOCAL_MODEL, seed=1)
    separator = vocals.load_vocal_separator(tmp_path)
    mono = tools.vocal_input(1.0, 3)[0]  # 44 100 samples written at 22.05 kHz: 2 s
    path = tmp_path / "speech.wav"
    soundfile.write(str(path), mono, 22050, subtype="FLOAT")
    stereo = vocals.read_stereo_44k(path)
    assert stereo.shape == (2, 88200) and np.array_equal(stereo[0], stereo[1])  # mono duplicated, 44.1 kHz
    out = vocals.separated_vocals(path, separator)
    assert out is not None and out.dtype == np.float32 and out.shape == (32000,)
    assert 0 < np.abs(out).max() <= 0.9  # a real, peak-limited stem
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(AudioDecodeFailed):
        vocals.read_stereo_44k(tmp_path / "bad.wav")


def test_model_parameters_from_uvr_model_data(tmp_path: Path) -> None:
    """audio-separator looks the model's parameters up in mdx_model_data.json by its hash; so do we, with
    Kim_Vocal_2's values when the file is absent or does not list the model."""
    _identity_model(tmp_path)
    path = vocals.vocal_model_path(tmp_path)
    assert vocals.model_params(path) == vocals.MdxParams()
    entry = {"compensate": 1.02, "mdx_dim_f_set": 2048, "mdx_dim_t_set": 7, "mdx_n_fft_scale_set": 6144}
    (path.parent / vocals.MODEL_DATA).write_text(json.dumps({vocals.model_hash(path): entry, "other": {}}))
    params = vocals.model_params(path)
    assert (params.n_fft, params.dim_f, params.dim_t, params.compensate) == (6144, 2048, 128, 1.02)
    assert vocals.load_vocal_separator(tmp_path).params == params
