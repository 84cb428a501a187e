"""Adapter residency (residency.py, TalkingVideoPipeline.use_adapter): the resident adapters, copied into
the DiT in place, give exactly the DiT a direct load of that adapter gives; offloaded blocks get their host
copies written; the startup checks verify each adapter file; the combinations that cannot swap are
refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, ModelLoadFailed
from multitalk_worker.models.configs import TINY
from multitalk_worker.pipeline.engine import EngineOptions
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline
from multitalk_worker.residency import (
    adapter_model,
    check_swappable,
    load_adapter_set,
    resident_adapters,
    wanted_adapters,
)
from multitalk_worker.startup import check_weights
from multitalk_worker.tiny import build_tiny_bundle, tiny_adapter_state
from multitalk_worker.weights.adapters import is_audio_key
from tests.tiny import INFINITETALK_FILES, write_all


def audio_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if is_audio_key(k)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_swapped_adapter_is_the_directly_loaded_one_in_place() -> None:
    pipeline = TalkingVideoPipeline(build_tiny_bundle(seed=0, dtype=torch.bfloat16))
    resident = load_adapter_set("tiny", "all", TINY, torch.bfloat16, "multitalk")
    assert resident.names() == ["multitalk", "single", "multi"]
    storage = {k: v.data_ptr() for k, v in pipeline.bundle.dit.state_dict().items()}
    for name in ("single", "multi", "multitalk"):
        model = adapter_model(name)[0]
        seconds = pipeline.use_adapter(model, name, resident.get(model, name).state)
        direct = build_tiny_bundle(seed=0, dtype=torch.bfloat16, model=model, adapter=name)
        assert same(audio_of(pipeline.bundle.dit), audio_of(direct.dit)), name
        assert (pipeline.bundle.model, pipeline.bundle.adapter) == (model, name) and seconds >= 0
    assert {k: v.data_ptr() for k, v in pipeline.bundle.dit.state_dict().items()} == storage  # no rebuild
    with pytest.raises(InvalidInput, match="does not serve multitalk/single"):
        resident.get("multitalk", "single")


def test_swap_under_offload_writes_the_host_copies() -> None:
    """A block on the device when the swap comes (the prefetched block 0) gets its host copy written, so
    its next visit brings the new adapter."""
    bundle = build_tiny_bundle(seed=0, dtype=torch.float32)
    pipeline = TalkingVideoPipeline(bundle, engine=EngineOptions(offload=True), device=torch.device("cpu"))
    offload = pipeline.offloads[0]
    offload._load(0)  # as after a forward pass: block 0 prefetched, its tensors are device copies
    state = tiny_adapter_state(0, "single")
    pipeline.use_adapter("infinitetalk", "single", state)
    offload._after(offload.blocks[0], (), None)  # block 0 leaves the device: its tensors are the host copies
    assert same(audio_of(pipeline.bundle.dit), state)


def test_folder_adapters_are_verified_and_made_resident(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(seed=0, dtype=torch.float32)
    states = {name: tiny_adapter_state(0, name) for name in INFINITETALK_FILES}
    adapters = {INFINITETALK_FILES[name]: state for name, state in states.items()}
    root = write_all(tmp_path / "model", bundle, "original", adapters=adapters)
    settings = Settings.from_env({"MULTITALK_WEIGHTS": str(root), "MULTITALK_ADAPTERS": "all"})
    assert [a.name for a in resident_adapters(settings)] == ["multitalk", "single", "multi"]
    check = check_weights(settings, full=True)
    assert check.ok, check.detail
    assert [part.split(":")[0] for part in check.detail.split(" | ")] == ["multitalk", "single", "multi"]
    resident = load_adapter_set(str(root), "single,multi", TINY, torch.float32, "single")
    for name, state in states.items():
        assert same(resident.get("infinitetalk", name).state, state)
    (root / INFINITETALK_FILES["multi"]).unlink()
    with pytest.raises(ModelLoadFailed, match="lacks the file"):
        load_adapter_set(str(root), "single,multi", TINY, torch.float32, "single")


def test_combinations_that_cannot_swap_are_refused() -> None:
    check_swappable(adapters=1, fp8=True, lora_targets=["blocks.0.audio_cross_attn.proj.weight"])
    with pytest.raises(ModelLoadFailed, match="MULTITALK_FP8"):
        check_swappable(adapters=2, fp8=True, lora_targets=[])
    with pytest.raises(ModelLoadFailed, match="undo its merge"):
        check_swappable(adapters=3, fp8=False, lora_targets=["blocks.0.audio_cross_attn.proj.weight"])
    check_swappable(adapters=3, fp8=False, lora_targets=["blocks.0.self_attn.q.weight"])
    with pytest.raises(InvalidInput, match="accepted: multitalk, single, multi"):
        wanted_adapters("single,bogus", [])


def test_swap_reaches_compiled_blocks_without_recompiling() -> None:
    """Parameters are inputs of the compiled block graphs: a swap changes the output to the new adapter's
    (as an eager DiT holding it computes) and compiles nothing new."""
    from torch._dynamo.utils import counters

    from multitalk_worker.models.runtime import FAST_RUNTIME, compile_blocks
    from multitalk_worker.weights.adapters import apply_adapter_state
    from tests.test_transformer import _inputs, _model

    compiled, eager = _model(), _model(seed=1)
    state = audio_of(eager)
    compile_blocks(compiled)
    inputs = _inputs(1, 1)
    with torch.inference_mode():
        before = compiled(**inputs, runtime=FAST_RUNTIME)
        graphs = counters["stats"]["unique_graphs"]
        apply_adapter_state(compiled, state)
        after = compiled(**inputs, runtime=FAST_RUNTIME)
        expected = _model(seed=0)
        apply_adapter_state(expected, state)
        reference = expected(**inputs, runtime=FAST_RUNTIME)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
