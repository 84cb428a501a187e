"""Audio adapters (weights/adapters.py): InfiniteTalk's single and multi files on the Wan base, in the
original layout (Wan's own index, MeiGen's index, no index) and the Diffusers layout, in the published
formats."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from multitalk_worker.errors import CheckpointError, InvalidInput, ModelMissing
from multitalk_worker.models.configs import TINY
from multitalk_worker.registry import get_model
from multitalk_worker.tiny import build_tiny_bundle, tiny_adapter_state
from multitalk_worker.weights.adapters import (
    apply_adapter_state,
    available_adapters,
    is_audio_key,
    load_adapter_state,
)
from multitalk_worker.weights.loader import ModelBundle, load_models
from multitalk_worker.weights.manifest import verify
from tests.test_weights import dit_inputs
from tests.tiny import INFINITETALK_FILES, MULTITALK_FILE, write_adapter, write_all

SEED = 3
SINGLE, MULTI = INFINITETALK_FILES["single"], INFINITETALK_FILES["multi"]
IT = get_model("infinitetalk")
Edit = Callable[[dict[str, torch.Tensor]], object]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return build_tiny_bundle(seed=SEED, dtype=torch.float32)


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    return {name: tiny_adapter_state(SEED, name) for name in INFINITETALK_FILES}


@pytest.fixture(scope="module")
def folders(
    bundle: ModelBundle, states: dict[str, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A stock Wan folder (Wan's own index, no multitalk.safetensors) with both InfiniteTalk files, and a
    Diffusers folder with all three adapter files."""
    root = tmp_path_factory.mktemp("adapters")
    adapters = {INFINITETALK_FILES[name]: state for name, state in states.items()}
    return {
        "original": write_all(
            root / "original", bundle, "original", index="wan", multitalk=False, adapters=adapters
        ),
        "diffusers": write_all(root / "diffusers", bundle, "diffusers", adapters=adapters),
    }


def fresh_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def edit_safetensors(path: Path, edit: Edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def audio_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_audio_key(k)}


def base_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not is_audio_key(k)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_written_files_are_the_published_format(folders: dict[str, Path]) -> None:
    """float32 safetensors with {"format": "pt"} and exactly the 8·L + 10 audio keys (L = 2: 26)."""
    blocks = [
        f"blocks.{n}.{module}.{param}"
        for n in range(2)
        for module in ("audio_cross_attn.q_linear", "audio_cross_attn.kv_linear",
                       "audio_cross_attn.proj", "norm_x")
        for param in ("weight", "bias")
    ]  # fmt: skip
    top = [
        f"audio_proj.{m}.{p}"
        for m in ("proj1", "proj1_vf", "proj2", "proj3", "norm")
        for p in ("weight", "bias")
    ]
    for file in (SINGLE, MULTI):
        with safe_open(folders["original"] / file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert sorted(handle.keys()) == sorted(blocks + top)
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_infinitetalk_adapters_load_exactly(
    layout: str, bundle: ModelBundle, folders: dict[str, Path]
) -> None:
    """Each adapter's values are the file's, bit for bit, on the multitalk tiny model's base; single and
    multi give different DiTs. The original layout picks the adapter by speaker count, the other by name."""
    loaded = {}
    for name, persons in (("single", 1), ("multi", 2)):
        choice = {"persons": persons} if layout == "original" else {"adapter": name}
        got = load_models(folders[layout], dtype=torch.float32, model="infinitetalk", **choice)
        assert (got.model, got.adapter) == ("infinitetalk", name)
        assert same(audio_of(got.dit), load_file(folders[layout] / INFINITETALK_FILES[name]))
        tiny = build_tiny_bundle(seed=SEED, dtype=torch.float32, model="infinitetalk", adapter=name)
        assert same(got.dit.state_dict(), tiny.dit.state_dict())
        assert same(base_of(got.dit), base_of(bundle.dit))
        loaded[name] = got
    assert not any(
        torch.equal(loaded["single"].dit.state_dict()[k], v) for k, v in audio_of(loaded["multi"].dit).items()
    )
    with torch.no_grad():
        single, multi = (loaded[n].dit(**dit_inputs(bundle)) for n in ("single", "multi"))
    assert not torch.allclose(single, multi)


def test_bf16_load_is_the_rounded_file(folders: dict[str, Path]) -> None:
    loaded = load_models(folders["original"], model="infinitetalk", adapter="multi")
    written = load_file(folders["original"] / MULTI)
    assert same(audio_of(loaded.dit), {k: v.to(torch.bfloat16) for k, v in written.items()})
    tiny = build_tiny_bundle(seed=SEED, model="infinitetalk", adapter="multi")
    assert same(loaded.dit.state_dict(), tiny.dit.state_dict())


@pytest.mark.parametrize(
    ("edit", "kind", "key"),
    [
        (lambda s: s.pop("audio_proj.norm.bias"), "missing tensor", "audio_proj.norm.bias"),
        (lambda s: s.update({"patch_embedding.bias": torch.zeros(32)}), "unexpected tensor",
         "patch_embedding.bias"),  # a base key: not the adapter's to set
        (lambda s: s.update({"blocks.2.norm_x.weight": torch.ones(32)}), "unexpected tensor",
         "blocks.2.norm_x.weight"),  # the tiny DiT has blocks 0 and 1
        (lambda s: s.update({"blocks.0.norm_x.bias": torch.zeros(3)}), "wrong shape", "blocks.0.norm_x.bias"),
    ],
)  # fmt: skip
def test_bad_adapter_file_is_refused_by_file_and_key(
    edit: Edit, kind: str, key: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    root = fresh_copy(folders["original"], tmp_path)
    edit_safetensors(root / SINGLE, edit)
    with pytest.raises(CheckpointError, match=kind) as info:
        load_models(root, model="infinitetalk", adapter="single")
    assert (info.value.file, info.value.key) == (SINGLE, key)
    with pytest.raises(CheckpointError, match=kind) as info:
        load_adapter_state(root, IT.adapter("single"), TINY)
    assert (info.value.file, info.value.key) == (SINGLE, key)
    report = verify(root, model="infinitetalk")
    assert [(p.kind.replace("_", " "), p.file, p.key) for p in report.problems] == [(kind, SINGLE, key)]
    assert verify(root, model="infinitetalk", adapter="multi").ok


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_verify_checks_every_adapter_of_the_model(layout: str, folders: dict[str, Path]) -> None:
    report = verify(folders[layout], model="infinitetalk")
    assert report.ok, str(report)
    assert report.adapters == (SINGLE, MULTI)
    assert str(report).splitlines()[0].endswith(f"model infinitetalk (adapters {SINGLE}, {MULTI})")


@pytest.mark.parametrize("removed", [SINGLE, MULTI])
def test_verify_reports_each_missing_adapter_file(
    removed: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    root = fresh_copy(folders["diffusers"], tmp_path)
    (root / removed).unlink()
    report = verify(root, model="infinitetalk")
    assert [(p.kind, p.file) for p in report.problems] == [("missing_file", removed)]
    other = "multi" if removed == SINGLE else "single"
    assert verify(root, model="infinitetalk", adapter=other).ok
    assert verify(root).ok  # multitalk.safetensors is still there
    with pytest.raises(ModelMissing, match=removed):
        load_models(root, model="infinitetalk", adapter="multi" if other == "single" else "single")


def test_multitalk_on_a_stock_wan_folder_reports_its_file_once(folders: dict[str, Path]) -> None:
    report = verify(folders["original"])
    assert [(p.kind, p.file) for p in report.problems] == [("missing_file", MULTITALK_FILE)]
    assert "MultiTalk audio layers (MeiGen-AI/MeiGen-MultiTalk)" in str(report)
    assert f"not checked: {SINGLE}, {MULTI} (--model infinitetalk)" in report.notes


@pytest.mark.parametrize("index", ["meigen", "none"])
def test_meigen_index_and_no_index_serve_infinitetalk(
    index: str, bundle: ModelBundle, states: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """MeiGen's index (audio keys -> multitalk.safetensors) is not read for the audio layers of another
    adapter; a folder with no index reads all seven shards (the InfiniteTalk reference's way)."""
    adapters = {SINGLE: states["single"]}
    root = write_all(tmp_path / index, bundle, "original", index=index, adapters=adapters)  # type: ignore[arg-type]
    loaded = load_models(root, dtype=torch.float32, model="infinitetalk")
    assert same(audio_of(loaded.dit), states["single"]) and same(base_of(loaded.dit), base_of(bundle.dit))
    multitalk = load_models(root, dtype=torch.float32)
    assert same(multitalk.dit.state_dict(), bundle.dit.state_dict())
    report = verify(root, model="infinitetalk", adapter="single")
    assert report.ok, str(report)
    expected = "maps 26 keys to multitalk.safetensors" if index == "meigen" else "read from the 7 shards"
    assert any(expected in note for note in report.notes), report.notes


def test_no_index_names_a_missing_shard_only(bundle: ModelBundle, tmp_path: Path) -> None:
    root = write_all(tmp_path / "none", bundle, "original", index="none")
    shard = "diffusion_pytorch_model-00003-of-00007.safetensors"
    (root / shard).unlink()
    assert [(p.kind, p.file) for p in verify(root).problems] == [("missing_file", shard)]
    with pytest.raises(ModelMissing, match=shard):
        load_models(root)


def test_audio_key_in_a_base_shard_is_replaced_by_the_adapter(
    folders: dict[str, Path], states: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """The reference's rule (a later file overwrites): the adapter wins, and verify says so."""
    root = fresh_copy(folders["original"], tmp_path)
    key = "blocks.0.norm_x.weight"
    edit_safetensors(
        root / "diffusion_pytorch_model-00001-of-00007.safetensors",
        lambda s: s.update({key: torch.full((32,), 7.0)}),
    )
    loaded = load_models(root, dtype=torch.float32, model="infinitetalk", adapter="multi")
    assert torch.equal(loaded.dit.state_dict()[key], states["multi"][key])
    report = verify(root, model="infinitetalk")
    assert report.ok and any(f"(first: {key}) are not used" in note for note in report.notes), str(report)


def test_available_adapters(folders: dict[str, Path]) -> None:
    names = lambda adapters: [a.name for a in adapters]  # noqa: E731
    assert names(available_adapters(folders["original"])) == ["single", "multi"]
    assert names(available_adapters(folders["diffusers"])) == ["multitalk", "single", "multi"]
    assert names(available_adapters(folders["diffusers"], "infinitetalk")) == ["single", "multi"]
    assert names(available_adapters(folders["original"], "multitalk")) == []


def test_load_adapter_state_swaps_an_adapter_in_place(folders: dict[str, Path]) -> None:
    """Read one file's tensors (checked), then copy them into a loaded multitalk DiT: the InfiniteTalk DiT."""
    multitalk = build_tiny_bundle(seed=SEED)
    state = load_adapter_state(
        folders["diffusers"], IT.adapter("multi"), multitalk.config, torch.bfloat16, "cpu"
    )
    written = load_file(folders["diffusers"] / MULTI)
    assert same(state, {k: v.to(torch.bfloat16) for k, v in written.items()}) and len(state) == 26
    apply_adapter_state(multitalk.dit, state)
    tiny = build_tiny_bundle(seed=SEED, model="infinitetalk", adapter="multi")
    assert same(multitalk.dit.state_dict(), tiny.dit.state_dict())
    with pytest.raises(CheckpointError, match="missing tensor"):
        apply_adapter_state(multitalk.dit, {k: v for k, v in state.items() if k != "audio_proj.norm.bias"})
    with pytest.raises(CheckpointError, match="shape"):
        apply_adapter_state(multitalk.dit, {**state, "audio_proj.norm.bias": torch.zeros(3)})


def test_unknown_model_or_adapter_is_invalid_input(folders: dict[str, Path]) -> None:
    with pytest.raises(InvalidInput, match="accepted: multitalk"):
        load_models(folders["diffusers"], model="multitalk", adapter="single")
    with pytest.raises(InvalidInput, match="accepted: single, multi"):
        verify(folders["diffusers"], model="infinitetalk", adapter="multitalk")


def test_weights_verify_command_per_model(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from multitalk_worker.cli import main
    from multitalk_worker.weights.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    run = lambda *argv: (lambda a: a.func(a))(parser.parse_args(["weights", "verify", *argv]))  # noqa: E731
    assert run(str(folders["original"]), "--model", "infinitetalk") == 0
    assert "OK" in capsys.readouterr().out
    root = fresh_copy(folders["original"], tmp_path)
    write_adapter(root, MULTI, {"audio_proj.norm.bias": torch.zeros(32)})  # a truncated download
    assert run(str(root), "--model", "infinitetalk") == 1
    out = capsys.readouterr().out
    assert f"missing_tensor: {MULTI} [audio_proj.norm.weight]" in out
    assert run(str(root), "--model", "infinitetalk", "--adapter", "single") == 0
    assert main(["weights", "verify", str(root), "--model", "multitalk", "--adapter", "single"]) == 1
    assert "error [INVALID_INPUT]: model multitalk has no adapter 'single'" in capsys.readouterr().err
