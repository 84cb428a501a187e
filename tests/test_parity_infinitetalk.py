"""Our InfiniteTalk loading, DiT and clip loop against outputs of the official code (InfiniteTalk @ 0107cd9).

tests/fixtures/parity/infinitetalk/ was written by
`python tools/parity.py --model infinitetalk --reference <checkout> --write-fixtures`
(tools/_parity_infinitetalk_cases.py ran the reference on CPU): the parity tiny DiT in InfiniteTalk's layout
(seven Wan shards, Wan's index, config.json, single/ and multi/infinitetalk.safetensors), a 25 fps H.264
source video, and the reference's outputs: the DiT state after its own __init__ (as SHA-256 digests),
whether it refuses an adapter with a missing or an extra key, the adapter's value on a key that a base
shard also holds, one DiT forward per adapter, and five streaming runs of generate_infinitetalk (each
clip's final latent, decoded colour-corrected clip, reference frame and motion latent; the source frame of
each clip; the uint8 output, thinned). The T5, CLIP, VAE and wav2vec2 weights are the MultiTalk
fixtures' (tests/fixtures/parity/). tools/_parity_infinitetalk_ours.py runs our side, the same code the
tool runs: loads bitwise, float32 within rel_err 1e-4, bf16 as the MultiTalk DiT stages.
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
IT_FIXTURES = FIXTURES / "infinitetalk"
MANIFEST = json.loads((IT_FIXTURES / "manifest.json").read_text())
STAGES = list(MANIFEST["tolerances"])
Case = dict[str, dict[str, torch.Tensor]]
# scikit-image warns when a colour-corrected Lab value falls outside sRGB (it clips, as in the reference)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB:UserWarning")


@pytest.fixture(scope="module")
def ours() -> ModuleType:
    """tools/_parity_infinitetalk_ours.py: the same code path tools/parity.py runs for our side."""
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module("_parity_infinitetalk_ours")


def _grouped(file: str) -> dict[str, Case]:
    grouped: dict[str, Case] = {}
    for key, tensor in load_file(str(IT_FIXTURES / file)).items():
        stage, kind, name = key.split("/", 2)
        grouped.setdefault(stage, {"in": {}, "ref": {}})[kind][name] = tensor
    return grouped


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    """stage -> {"in": inputs, "ref": reference outputs (stored form)}."""
    return _grouped("cases.safetensors") | _grouped("pipeline_cases.safetensors")


def _check(stage: str, ours: ModuleType, case: Case, work: Path) -> tuple[float, float, str | None]:
    outputs = ours.it_stored_form(stage, ours.run_it_stage(stage, FIXTURES, case["in"], work))
    max_abs, err, note = ours.compare_it(stage, outputs, case["ref"])
    tolerance = MANIFEST["tolerances"][stage]
    print(f"{stage} max_abs_err {max_abs:.3e} error {err:.3e} tolerance {tolerance:.0e} {note or ''}")
    assert err <= tolerance, f"{stage}: error {err:.3e} > {tolerance:.0e} (max_abs_err {max_abs:.3e}; {note})"
    return max_abs, err, note


def test_every_stage_is_stored(ours: ModuleType, cases: dict[str, Case]) -> None:
    assert set(STAGES) == set(ours.IT_TOLERANCES) == set(cases)
    assert MANIFEST["tolerances"] == ours.IT_TOLERANCES
    for name in ours.RUN_STAGES:  # a final latent and a decoded clip per clip
        clips = {k for k in cases[name]["ref"] if k.startswith("latent_")}
        assert len(clips) == (4 if name == "it_frames" else 2), name


def test_reference_facts_in_the_fixtures(cases: dict[str, Case]) -> None:
    """What the stored reference runs say about InfiniteTalk's loop (its spec 4.4, 5.5), independent of us:
    references at source frames 72k clamped to the last frame (99), N = min(La, Fmax), the adapter wins a
    key collision, and both faults refused."""
    ids = {name: cases[name]["ref"]["frame_ids"].tolist() for name in ("it_v2v_1p", "it_frames", "it_i2v_1p")}
    assert ids == {"it_v2v_1p": [0, 72], "it_frames": [0, 72, 99, 99], "it_i2v_1p": [-1, -1]}
    lengths = {
        name: int(case["ref"]["frames_shape"][0]) for name, case in cases.items() if name.endswith("p")
    }
    lengths["it_frames"] = int(cases["it_frames"]["ref"]["frames_shape"][0])
    # La = 102 (speech_a), 87 (speech_b, para), 292 (speech_aba); Fmax = 90 and 250 where capped
    assert lengths == {"it_i2v_1p": 102, "it_i2v_2p": 87, "it_v2v_1p": 90, "it_v2v_2p": 87, "it_frames": 250}
    assert torch.equal(cases["it_load_refuses"]["ref"]["missing"], torch.tensor(1))
    assert torch.equal(cases["it_load_refuses"]["ref"]["extra"], torch.tensor(1))
    adapter = load_file(str(IT_FIXTURES / "single" / "infinitetalk.safetensors"))["blocks.0.norm_x.weight"]
    assert torch.equal(cases["it_load_collision"]["ref"]["value"], adapter.to(torch.bfloat16).float())


@pytest.mark.parametrize("stage", [s for s in STAGES if s.startswith("it_load_")])
def test_load_matches_reference(stage: str, ours: ModuleType, cases: dict[str, Case], tmp_path: Path) -> None:
    _check(stage, ours, cases[stage], tmp_path)


@pytest.mark.parametrize("stage", [s for s in STAGES if s.startswith(("it_dit_", "it_audio_proj_"))])
def test_dit_matches_reference(stage: str, ours: ModuleType, cases: dict[str, Case], tmp_path: Path) -> None:
    _check(stage, ours, cases[stage], tmp_path)


def test_a_one_percent_adapter_error_is_caught(
    ours: ModuleType, cases: dict[str, Case], tmp_path: Path
) -> None:
    """The stages are sensitive: one multi-adapter projection scaled by 1.01 changes the loaded state and
    fails the two-person float32 DiT by far."""
    shutil.copytree(IT_FIXTURES, tmp_path / "infinitetalk")
    for encoder in ("t5", "clip", "vae", "wav2vec"):
        (tmp_path / encoder).symlink_to(FIXTURES / encoder)
    path = tmp_path / "infinitetalk" / "multi" / "infinitetalk.safetensors"
    tensors = load_file(str(path))
    tensors["blocks.1.audio_cross_attn.proj.weight"] *= 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = ours.it_stored_form(
        "it_load_multi_bf16", ours.run_it_stage("it_load_multi_bf16", tmp_path, {}, tmp_path)
    )
    assert ours.compare_it("it_load_multi_bf16", loaded, cases["it_load_multi_bf16"]["ref"])[1] == 1
    case = cases["it_dit_2p_f32"]
    out = ours.run_it_stage("it_dit_2p_f32", tmp_path, case["in"], tmp_path)
    assert (
        ours.compare_it("it_dit_2p_f32", out, case["ref"])[1] > 10 * MANIFEST["tolerances"]["it_dit_2p_f32"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", [s for s in STAGES if not s.startswith(("it_load_", "it_dit_", "it_audio_proj_"))]
)
def test_generation_matches_reference(
    stage: str, ours: ModuleType, cases: dict[str, Case], tmp_path: Path
) -> None:
    _check(stage, ours, cases[stage], tmp_path)
