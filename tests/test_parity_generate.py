"""Our audio front end and MultiTalkPipeline against outputs of the official MultiTalk code (c1ad840).

tests/fixtures/parity/pipeline_cases.safetensors was written by
`python tools/parity.py --reference <checkout> --write-fixtures` (tools/_parity_pipeline_cases.py ran the
reference): the committed example speech through the reference's loading, loudness normalisation,
`para`/`add` preparation and get_embedding; and two two-clip streaming runs of its
MultiTalkPipeline.generate (81-frame clips, 25 motion frames, 3 steps, shift 7, colour correction on,
seeded) on the parity weights next to it. Here tools/_parity_pipeline_ours.py runs our side on the same
files and weights; every stage must match within rel_err 1e-4 (float32), and the uint8 output frames
within one level. The stored outputs are thinned (every 16th sample / frame) to keep the fixture small.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "parity"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
STAGES = list(MANIFEST["pipeline_tolerances"])
GENERATE_STAGES = [s for s in STAGES if s.startswith("generate_")]
Cases = dict[str, dict[str, dict[str, torch.Tensor]]]
# scikit-image warns when a colour-corrected Lab value falls outside sRGB (it clips, as in the reference)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB:UserWarning")


@pytest.fixture(scope="module")
def ours() -> ModuleType:
    """tools/_parity_pipeline_ours.py: the same code path tools/parity.py runs for our side."""
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module("_parity_pipeline_ours")


@pytest.fixture(scope="module")
def cases() -> Cases:
    """stage -> {"in": inputs, "ref": reference outputs (stored form)}."""
    grouped: Cases = {}
    for key, tensor in load_file(str(FIXTURES / "pipeline_cases.safetensors")).items():
        stage, kind, name = key.split("/", 2)
        grouped.setdefault(stage, {"in": {}, "ref": {}})[kind][name] = tensor
    return grouped


def test_every_pipeline_stage_is_stored(ours: ModuleType, cases: Cases) -> None:
    expected = {
        "audio_prepare_speech",
        "audio_features_speech",
        "generate_two_clips",
        "generate_two_clips_text1",
    }
    assert set(STAGES) == expected == set(cases)
    assert MANIFEST["pipeline_tolerances"] == ours.PIPELINE_TOLERANCES
    # two clips per run: a final latent and a decoded clip each
    for stage in GENERATE_STAGES:
        assert {k for k in cases[stage]["ref"] if k.startswith(("latent_", "video_"))} == {
            "latent_0", "latent_1", "video_0", "video_1"
        }  # fmt: skip


def _check(stage: str, ours: ModuleType, case: dict[str, dict[str, torch.Tensor]]) -> None:
    outputs = ours.stored_form(ours.run_pipeline_stage(stage, FIXTURES, case["in"]))
    max_abs, rel, _ = ours.compare_pipeline(outputs, case["ref"])
    tolerance = MANIFEST["pipeline_tolerances"][stage]
    assert rel <= tolerance, f"{stage}: rel_err {rel:.3e} > {tolerance:.0e} (max_abs_err {max_abs:.3e})"


@pytest.mark.parametrize("stage", ["audio_prepare_speech", "audio_features_speech"])
def test_speech_matches_reference(stage: str, ours: ModuleType, cases: Cases) -> None:
    _check(stage, ours, cases[stage])


@pytest.mark.slow
@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_generation_matches_reference(stage: str, ours: ModuleType, cases: Cases) -> None:
    _check(stage, ours, cases[stage])


def test_a_changed_gain_is_caught(ours: ModuleType, cases: Cases) -> None:
    """The speech comparison is sensitive: our signals 0.1 % louder fail the stage by far."""
    case = cases["audio_prepare_speech"]
    outputs = ours.stored_form(ours.run_pipeline_stage("audio_prepare_speech", FIXTURES, case["in"]))
    _, rel, _ = ours.compare_pipeline({k: v * 1.001 for k, v in outputs.items()}, case["ref"])
    assert rel > 5 * MANIFEST["pipeline_tolerances"]["audio_prepare_speech"]
