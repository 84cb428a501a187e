"""LongCat-Video-Avatar's audio path, schedules and step against outputs of the official code
(meituan-longcat/LongCat-Video @ 6b3f4b8).

tests/fixtures/parity/longcat_audio/ was written by
`python tools/parity_longcat_audio.py --reference <checkout> --write-fixtures` (seed 0): a tiny
whisper-large-v3 folder in the published layout, and per stage the reference's outputs: every stream's
features and each segment's window index table (tools/_parity_longcat_audio_cases.py says how the checkout
is run). The audio is made from each stage's parameters (its SHA-256 is stored); the v1.0 wav2vec2 is the
MultiTalk fixtures' tiny chinese-wav2vec2-base. tools/_parity_longcat_audio_ours.py runs our side, the same
code the tool runs.

Tolerances: the schedules, the bf16 timesteps, the Euler step, the guidance and the window indices bitwise;
the float32 features within max |Δ| / max |ref| <= 1e-5. Measured: bitwise for the zero-padded tracks
(float64 in the reference); 5e-6 abs (1e-6 relative) for unpadded tracks, because the tool runs the
reference under NumPy 2, which applies pyloudnorm's float64 gain in float64, where the reference's pinned
NumPy 1.26 (which we follow) applies it in float32 (with the float64 gain our side is bitwise, checked by
hand); wav2vec2 1.6e-6 to 2.7e-6 abs (the reference's forward forces eager attention under transformers 5,
ours is SDPA). The vocal stage (audio-separator 0.30.2, run with --audio-separator): stem 1.8e-7 abs, the
16 kHz vocal 6.2e-6 (within one 16-bit step, its tolerance); bitwise with NumPy 2's peak-limit factor.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "parity"
LC_FIXTURES = FIXTURES / "longcat_audio"
MANIFEST = json.loads((LC_FIXTURES / "manifest.json").read_text())
Case = dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def ours() -> ModuleType:
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module("_parity_longcat_audio_ours")


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    grouped: dict[str, Case] = {}
    for key, tensor in load_file(str(LC_FIXTURES / "cases.safetensors")).items():
        stage, kind, name = key.split("/", 2)
        grouped.setdefault(stage, {"in": {}, "ref": {}})[kind][name] = tensor
    return grouped


def test_every_stage_is_stored(ours: ModuleType, cases: dict[str, Case]) -> None:
    assert set(cases) == set(ours.AUDIO_STAGES) | set(ours.SCHEDULES) | {"step_guidance", "vocals"}
    assert MANIFEST == {"seed": 0, "tolerance_f32": ours.TOLERANCE_F32}


def test_reference_schedule_facts(cases: dict[str, Case]) -> None:
    """What the stored reference says, independent of our code (spec §7.1-7.2): the distilled bf16
    timesteps, and enhance_hf's 53 / 56 steps at shift 7 / 12."""
    distilled = cases["sched_distill_v15"]["ref"]["model_timesteps"]
    assert distilled.tolist() == [1000, 980, 956, 920, 876, 808, 700, 498]
    assert cases["sched_enhance_hf_50_s7"]["ref"]["timesteps"].shape == (53,)
    assert cases["sched_enhance_hf_50_s12"]["ref"]["timesteps"].shape == (56,)


@pytest.mark.parametrize("stage", ["sched_distill_v15", "sched_default_50_s12", "sched_enhance_hf_50_s12"])
def test_schedule_matches_bitwise(stage: str, ours: ModuleType, cases: dict[str, Case]) -> None:
    assert ours.compare(ours.run_schedule_stage(stage), cases[stage]["ref"]) == (0.0, 0.0)


def test_every_schedule_matches_bitwise(ours: ModuleType, cases: dict[str, Case]) -> None:
    for stage in ours.SCHEDULES:
        assert ours.compare(ours.run_schedule_stage(stage), cases[stage]["ref"]) == (0.0, 0.0), stage


def test_step_and_guidance_match_bitwise(ours: ModuleType, cases: dict[str, Case]) -> None:
    case = cases["step_guidance"]
    assert ours.compare(ours.run_step_stage(case["in"]), case["ref"]) == (0.0, 0.0)


def _audio_stage(stage: str, ours: ModuleType, case: Case, fixtures: Path) -> tuple[float, float]:
    assert torch.equal(case["in"]["signal_sha256"], ours.digest(ours.stage_signals(stage, MANIFEST["seed"])))
    outputs = ours.run_audio_stage(stage, fixtures, MANIFEST["seed"])
    indices = {k: v for k, v in case["ref"].items() if k.startswith("indices_")}
    assert ours.compare({k: outputs[k] for k in indices}, indices) == (0.0, 0.0)
    return ours.compare(outputs, case["ref"])


@pytest.mark.parametrize("stage", ["whisper_3s_padded", "wav2vec_3s_padded", "wav2vec_7s"])
def test_audio_features_match(stage: str, ours: ModuleType, cases: dict[str, Case]) -> None:
    worst, relative = _audio_stage(stage, ours, cases[stage], FIXTURES)
    print(f"{stage}: max_abs_err {worst:.3e} relative {relative:.3e}")
    assert relative <= ours.TOLERANCE_F32


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", ["whisper_2p_add_others", "whisper_2p_para", "whisper_30s", "whisper_31s_s3"]
)
def test_more_audio_features_match(stage: str, ours: ModuleType, cases: dict[str, Case]) -> None:
    """Two persons (with the silent others stream), one full and two 30 s Whisper windows (the tiny
    32-layer encoder takes 5-10 s per 30 s window on a shared CPU)."""
    worst, relative = _audio_stage(stage, ours, cases[stage], FIXTURES)
    print(f"{stage}: max_abs_err {worst:.3e} relative {relative:.3e}")
    assert relative <= ours.TOLERANCE_F32


def test_a_one_percent_whisper_error_is_caught(
    ours: ModuleType, cases: dict[str, Case], tmp_path: Path
) -> None:
    """The stage is sensitive: one encoder layer's output projection scaled by 1.01 fails it by far."""
    shutil.copytree(LC_FIXTURES, tmp_path / "longcat_audio")
    path = tmp_path / ours.WHISPER_DIR / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.encoder.layers.20.fc2.weight"] *= 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    _, relative = _audio_stage("whisper_3s_padded", ours, cases["whisper_3s_padded"], tmp_path)
    assert relative > 10 * ours.TOLERANCE_F32


def test_vocal_separation_matches(ours: ModuleType, cases: dict[str, Case], tmp_path: Path) -> None:
    """pipeline/vocals.py against audio-separator 0.30.2's MDX computation on the tiny ONNX model (written
    again here from the seed: the fixture stores only the reference's outputs)."""
    pytest.importorskip("onnx")
    ours.write_tiny_mdx(tmp_path / ours.VOCAL_MODEL, MANIFEST["seed"])
    outputs = ours.run_vocal_stage(tmp_path / "longcat_audio", MANIFEST["seed"])
    worst, relative, ok = ours.vocal_check(outputs, cases["vocals"]["ref"])
    print(f"vocals: max_abs_err {worst:.3e} relative {relative:.3e}")
    assert ok
